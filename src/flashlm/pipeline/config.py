"""Engine settings: one frozen record, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashlm.errors import ConfigError
from flashlm.io.writer import TORCH_DTYPES


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "float32"  # compute dtype; float16/bfloat16 GEMV is slow on most CPUs
    max_context: int | None = None  # tokens per request (prompt + answer); None: the model's limit, capped at 8192
    num_threads: int | None = None  # torch intra-op threads; None: 1 on machines with <= 2 CPUs, else torch's default
    store_dtype: str = "float16"  # dtype used when a built-in model is converted on first use

    def __post_init__(self) -> None:
        for name in ("dtype", "store_dtype"):
            if getattr(self, name) not in TORCH_DTYPES:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {sorted(TORCH_DTYPES)}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {self.device!r} is not a torch device ({e}); use cpu, cuda or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: CUDA is not available in this torch build/machine; use cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {self.device!r}: MPS is not available here; use cpu")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"device {self.device!r}: only cpu, cuda and mps are supported")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise ConfigError(f"max_context must be an int >= 2, got {self.max_context!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ConfigError(f"num_threads must be a positive int, got {self.num_threads!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
