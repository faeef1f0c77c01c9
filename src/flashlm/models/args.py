"""Reading a transformers config into an Args: the checks every family's `from_hf_config`
shares, and the derived sizes every Args has under one set of names."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flashlm.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Derived:
    """The sizes the engine reads from any Args, whatever its config calls them; each family's
    __post_init__ sets them (`derive`)."""

    n_layers: int = field(init=False)
    d_model: int = field(init=False)
    d_ff: int = field(init=False)
    n_heads: int = field(init=False)
    n_kv_heads: int = field(init=False)


def positive(value: Any, key: str, model_type: str) -> int:
    """`value` of config key `key`, which must be a positive int (a size or a count)."""
    if value is None:
        raise UnsupportedArchitectureError(f"{model_type}: the model config has no {key!r}; a {model_type} model "
                                           f"needs it (fix the checkpoint's config.json)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedArchitectureError(f"{model_type}: config {key}={value!r} must be a positive int "
                                           f"(fix the checkpoint's config.json)")
    return value


def derive(args: Any, **values: Any) -> None:
    """Set the derived fields (`field(init=False)`) of a frozen Args in its __post_init__."""
    for name, value in values.items():
        object.__setattr__(args, name, value)


def hf_size(cfg: dict, key: str, model_type: str, default: int | None = None) -> int:
    """A positive int from a transformers config dict (`default` when the key is absent or null)."""
    value = cfg.get(key)
    return positive(default if value is None else value, key, model_type)


def hf_config(read: Callable[[Any, dict], Any]) -> Callable[[Any, dict], Any]:
    """Wraps an Args' `from_hf_config(cls, cfg)`: a config that is not a dict, or whose value of
    a key is missing or of the wrong type where the reading did not check it by name, is an
    UnsupportedArchitectureError naming what failed, never a bare KeyError or TypeError."""

    @functools.wraps(read)
    def checked(cls: Any, cfg: dict) -> Any:
        mt = getattr(cls, "MODEL_TYPE", cls.__name__)
        if not isinstance(cfg, dict):
            raise UnsupportedArchitectureError(f"{mt}: the model config is a {type(cfg).__name__}, not a mapping")
        try:
            return read(cls, cfg)
        except KeyError as e:
            raise UnsupportedArchitectureError(f"{mt}: the model config has no {e.args[0]!r}; a {mt} model needs it "
                                               f"(fix the checkpoint's config.json)") from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise UnsupportedArchitectureError(f"{mt}: the model config has a value of the wrong type or range "
                                               f"({type(e).__name__}: {e}); fix the checkpoint's config.json") from None

    return checked
