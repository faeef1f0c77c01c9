"""What every conversion source shares: the `Checkpoint` interface, its checks, the read helper."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flashlm.errors import SourceCheckpointError
from flashlm.log import get_logger

log = get_logger(__name__)

CHUNK_ELEMENTS = 1 << 21  # values dequantised or cast per step: 8 MiB in float32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Keys transformers adds to a config that describe the source file, not the model.
DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


def quiet() -> contextlib.AbstractContextManager[Any]:
    """transformers prints progress and advice to stdout; keep the CLI's output ours."""
    return contextlib.redirect_stdout(io.StringIO())


class Checkpoint:
    """A source's config, its tensors' names and shapes, and each tensor on demand."""

    where: str

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}  # the transformers config, as a dict

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """transformers key -> shape, in the source's order (a tied lm_head left out)."""
        raise NotImplementedError

    def read(self, key: str, dtype: torch.dtype) -> Tensor:
        """The tensor under `key`; floating tensors in `dtype`."""
        raise NotImplementedError

    def save_tokenizer(self, directory: Path) -> None:
        """Write the source's tokenizer into `directory`; nothing when it has none (a warning says so)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared --------------------------------------------------------------------------

    def _expected_keys(self, hf_config: Any) -> tuple[set[str], Any]:
        """The state-dict keys of the model this config builds (on the meta device: no memory)."""
        from transformers import AutoModelForCausalLM

        try:
            with quiet(), torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config)
        except Exception as e:  # noqa: BLE001 - transformers refuses a config in many ways
            raise SourceCheckpointError(f"{self.where}: transformers cannot build this model ({e})") from None
        keys = set(model.state_dict())
        if self.config.get("tie_word_embeddings", False):
            keys.discard("lm_head.weight")  # the same tensor as the embedding; not stored twice
        return keys, model

    def _check_complete(self, found: set[str], expected: set[str]) -> None:
        missing = sorted(expected - found)
        if missing:
            raise SourceCheckpointError(
                f"{self.where}: cannot load the weights ({len(missing)} tensors the model needs are not in the "
                f"source, e.g. {missing[:3]})"
            )

    def _tokenizer(self, directory: Path, **kw: Any) -> None:
        from transformers import AutoTokenizer

        try:
            with quiet():
                tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_dir, **kw)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("tokenizer unreadable; the store will take token ids only", source=self.where, error=str(e))
            return
        tokenizer.save_pretrained(str(directory))

    _tokenizer_dir: Path


def pread_into(fd: int, buf: np.ndarray, offset: int, what: str) -> None:
    """Fill `buf` from `fd` at `offset` (os.preadv: no memory map, so nothing stays in RSS)."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise SourceCheckpointError(f"{what} is cut short (the file was truncated)")
        got += n
