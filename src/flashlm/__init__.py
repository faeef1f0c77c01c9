"""flashlm: run language models larger than memory, FFN neurons streamed from flash.

    engine = await Engine.open("smollm2-135m")
    async for chunk in engine.stream("Hello"):
        print(chunk.text, end="")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flashlm.errors import *  # noqa: F403 - the named errors are public API
from flashlm.errors import FlashLMError
from flashlm.version import __version__

# The engine pulls in torch and transformers; resolve it on first use so `import flashlm`
# (and `flashlm --help`, and `flashlm.io`) stay light.
_LAZY = {
    "Engine": "flashlm.pipeline.engine",
    "Stream": "flashlm.pipeline.engine",
    "EngineConfig": "flashlm.pipeline.config",
    "StreamChunk": "flashlm.pipeline.stream",
    "TokenTimings": "flashlm.pipeline.stream",
}

if TYPE_CHECKING:
    from flashlm.pipeline.config import EngineConfig
    from flashlm.pipeline.engine import Engine, Stream
    from flashlm.pipeline.stream import StreamChunk, TokenTimings


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashlm' has no attribute {name!r}")


__all__ = ["Engine", "EngineConfig", "FlashLMError", "Stream", "StreamChunk", "TokenTimings", "__version__"]
