"""Engine settings: what a user picks (`EngineConfig`), apart from the paper's research knobs
(`Research`, nested in it), each field declared once with its help, choices and default
(`Setting`): the CLI builds its options from them (`flashlm.cli.settings`) and README's
settings table is generated from them. Validated as a record is made, by the rules at the end
of this module (Research's fields by Research; the rest, and the rules across both, by
EngineConfig)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from flashlm.errors import ConfigError
from flashlm.io.backend import Backend
from flashlm.pipeline.budget import parse_budget
from flashlm.io.format import DTYPE_SIZES, STORE_DTYPES

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the CLI builds its options from these declarations, and
# `flashlm --help` stays light
COMPUTE_DTYPES = tuple(sorted(DTYPE_SIZES))


SELECTIONS = ("auto", "dense", "gate", "shadow", "predictor", "griffin", "sign")
# "auto" resolves at open: "dense" unless a density was asked for (then this selection). Under a
# budget that cannot cache every neuron "dense" is exact mode: the neurons not held are streamed
# each token (flashlm.pipeline.streaming); the selectors that hold less cost far more accuracy
# on gated models (docs/budget.md). "auto" never picks "griffin": the prompt's own set runs ~2x faster
# a token than exact mode at the same budget, but at 0.5 it cost +165-566% perplexity on
# Qwen2.5-Coder-1.5B (+13-25% even at 0.75) against a +5% goal (docs/budget.md, "Griffin under a budget");
# nor "sign": on Qwen2.5-Coder-0.5B at density 0.5 +63-286%, and slower than exact mode (docs/budget.md)
AUTO_SPARSE = "shadow"
DEFAULT_DENSITY = 0.4


@dataclass(frozen=True)
class Setting:
    """One field's description, declared beside it: the CLI option's and README's text."""

    help: str  # what it does (the CLI help and README's meaning; no default in it)
    choices: tuple[Any, ...] | None = None  # the values allowed (validation, CLI choices, the help)
    default_text: str | None = None  # the default in words, where the value alone does not say (None, ...)
    flag: str | None = None  # the option of run/chat/serve, if any
    metavar: str | None = None  # its value's name in the CLI help


def setting(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(help, **kw)})


def describe(record: type, name: str) -> Setting:
    return next(f for f in fields(record) if f.name == name).metadata["setting"]


def _int(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, not a window of 1 token)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 < value <= 1


def one_of(choices: tuple[Any, ...]) -> str:
    return f"{choices[0]!r} or {choices[1]!r}" if len(choices) == 2 else f"one of {choices}"


@dataclass(frozen=True)
class Research:
    """The paper's knobs: its ablations (window, eviction, reuse, lookahead, where torch runs,
    how flash is read) and DIP's masking for griffin. Their defaults are the engine's best; a
    user has no reason to change them but to measure what each part of the method is worth
    (`flashlm bench paper`). The CLI offers some (--window, --eviction, --cache-gamma) for
    those measurements; Engine.open takes all of them by name."""

    window: int = setting(8, "tokens a selected neuron stays computed: one selected in the last K tokens is "
                          "computed (the paper's sliding window k)", flag="--window", metavar="K")
    eviction: str = setting("lazy", "lazy: a neuron that left the window stays cached until its slot is needed "
                            "(the FFN masks it out); window: evicted as it leaves the window (the paper's); same "
                            "tokens, fewer reads with lazy", choices=("lazy", "window"), flag="--eviction")
    reuse: bool = setting(True, "False: the caches are emptied after every token (the paper's hybrid baseline "
                          "re-reads every neuron)")
    compute: str = setting("thread", "thread: torch runs on a dedicated compute thread; loop: inline on the event "
                           "loop", choices=("thread", "loop"))
    lookahead: int = setting(1, "1: layer l+1's neurons predicted from layer l's attention output and prefetched; "
                             "0: serial (and no speculative set in the memory plan: a lower minimum)",
                             choices=(0, 1))
    io_backend: Any = setting("auto", "how flash is read: auto (batch where its C extension is built and io_uring "
                              "is allowed, else threads), threads (os.preadv workers), uring (io_uring, the uring "
                              "extra), batch (C io_uring batches), or a flashlm.io.backend.Backend",
                              choices=("auto", "threads", "uring", "batch"))
    in_flight: int = setting(32, "reads in flight per store, in [1, 256]")
    page_cache: bool = setting(False, "False: O_DIRECT reads (honest timings); True: buffered reads")
    # a research knob, not a user's: it tunes two selections' scores (griffin's, sign's) and is off by default
    cache_gamma: float | None = setting(
        None, "with selection griffin or sign: the scores of neurons not held in DRAM x G, in (0, 1] (DIP's cache-aware "
        "masking: < 1 leans the set to what is held, fewer reads after the prompt)", default_text="None: off",
        flag="--cache-gamma", metavar="G")

    def __post_init__(self) -> None:
        _check_research(self)


RESEARCH = tuple(f.name for f in fields(Research))


@dataclass(frozen=True, init=False)
class EngineConfig:
    """`EngineConfig(selection="shadow", window=4, ...)`: the user's settings and the research
    ones (`Research`) by their flat names, as `Engine.open(model, **settings)` takes them; or
    `research=Research(...)`, a flat research name replacing its field. Read them as
    `config.selection`, `config.research.window`; `config.settings()` is the flat record.

    `ffn` is a user's: where the FFN lives is a deployment choice, like the device (RAM when the
    model fits), and `--ram` of run/chat/serve; that the paper's dense baseline is ffn="ram"
    makes it no ablation of the flash machinery."""

    device: str = setting("cpu", "where to compute: cpu, cuda, cuda:N or mps", flag="--device")
    dtype: str = setting("float32", "compute dtype (float16/bfloat16 GEMV is slow on most CPUs)",
                         choices=COMPUTE_DTYPES)
    max_context: int | None = setting(
        None, "tokens per request or conversation (prompt + answer); above the model's limit: ConfigError; the "
        "memory budget counts one KV cache of this size", default_text="the model's limit, capped at 8192",
        flag="--max-context", metavar="N")
    num_threads: int | None = setting(
        None, "compute threads: the quantised kernels' rows split across N, and torch's intra-op threads on float "
        "stores (1 on quantised ones)", default_text="kernels on the physical cores, torch 1 on <= 2 CPUs",
        flag="--threads", metavar="N")
    store_dtype: str | None = setting(
        None, "dtype a built-in model's store is converted to on first use", choices=tuple(STORE_DTYPES),
        default_text="the built-in's own (flashlm pull --list)", flag="--store-dtype")
    ffn: str = setting("flash", "where the FFN lives: flash reads neurons from the store into per-layer caches; "
                       "ram holds the whole FFN resident (the dense baseline)", choices=("flash", "ram"), flag="--ram")
    selection: str = setting(
        "auto", "how the neurons to compute are chosen: auto (every neuron, cached when they all fit, else exact mode "
        "streaming the rest; with a density under a budget, shadow), dense (every neuron), gate, shadow, predictor "
        "(needs flashlm calibrate), griffin (the prompt computes every neuron and picks each layer's set for the "
        "answer: as many as the budget holds, or the density), sign (per token, the top density of each layer by "
        "1-bit sign copies of gate and up: needs flashlm calibrate --sign)", choices=SELECTIONS, flag="--selection")
    density: float | None = setting(
        None, "fraction of each layer's neurons selected per token, in (0, 1]",
        default_text=f"the mode's: {DEFAULT_DENSITY}, 1 for dense, griffin every row the budget holds, sign 0.5",
        flag="--density", metavar="D")
    memory_budget: int | float | str | None = setting(
        None, "DRAM budget: bytes, a size such as 600MiB, or a fraction of the model's bytes in its store (resident "
        "file + FFN bundles) such as 0.5", default_text="None: no budget", flag="--memory-budget", metavar="SIZE")
    # The prompt cache (flashlm.pipeline.prefix_cache; docs/prompt-cache.md). A finished request's
    # KV is kept, keyed by its tokens. Only where a token's result does not depend on the
    # request's earlier steps' neuron selections: ffn="ram" or selection "dense" with every neuron
    # cached (what "auto" picks when they fit); off under a sparse selection and in exact mode.
    # Exact: on int8/q4 stores the kernels and attention give a batched prefill's every row
    # bitwise its one-token step (kernels/csrc/attn.c, layer.c, drivers.c); float stores
    # compute on torch, whose matmuls round by batch shape (last bits; greedy tokens equal in the tests).
    prefix_cache: bool = setting(
        True, "the prompt cache: a later prompt that starts the same way as a kept earlier one prefills only the "
        "rest (same tokens as a cold start; only with every neuron computed: ram, or dense with all cached)")
    prefix_cache_bytes: int | str | None = setting(
        None, "bytes the kept prefixes of earlier requests may hold: a size such as 512MiB, 0 keeps none; under a "
        "memory budget only what it has left once every neuron is cached (docs/prompt-cache.md)",
        default_text="one KV cache at max_context", flag="--prompt-cache", metavar="SIZE")
    trace: str | os.PathLike[str] | None = setting(
        None, "write a JSON-lines trace of every token and layer to this file (docs/trace.md; flashlm trace report "
        "explains it)", default_text="None: off", flag="--trace", metavar="FILE")
    trace_max_bytes: int = setting(256 * 2**20, "past this the trace rotates to TRACE.1: at most twice this on disk",
                                   default_text="256 MiB")
    research: Research = field(default_factory=Research)

    def __init__(self, *, research: Research | None = None, **settings: Any) -> None:
        if research is not None and not isinstance(research, Research):
            raise ConfigError(f"research must be a flashlm.pipeline.config.Research, got {type(research).__name__}")
        unknown = sorted(set(settings) - set(USER) - set(RESEARCH))
        if unknown:
            raise ConfigError(f"unknown EngineConfig field(s) {', '.join(map(repr, unknown))}; "
                              f"the fields are {', '.join(sorted(USER + RESEARCH))}")
        for f in fields(self):
            if f.name != "research":
                object.__setattr__(self, f.name, settings.get(f.name, f.default))
        base = research or Research()
        knobs = {k: settings[k] for k in RESEARCH if k in settings}
        object.__setattr__(self, "research", Research(**{**base.__dict__, **knobs}) if knobs else base)
        _check_user(self)

    @classmethod
    def merged(cls, config: EngineConfig | None, settings: Mapping[str, Any]) -> EngineConfig:
        """`config` with `settings` (flat EngineConfig names, `settings()`'s) replacing its fields:
        `Engine.open`'s `config` and `**settings` together. An unknown name is a ConfigError."""
        if config is None:
            return cls(**settings)
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
        return config.replace(**settings) if settings else config

    def replace(self, **settings: Any) -> EngineConfig:
        """This config with the named fields (flat names) replaced, validated again."""
        return EngineConfig(**{**self.settings(), **settings})

    def settings(self) -> dict[str, Any]:
        """Every field by its flat name (what Engine.open takes, what traces and bench JSON record)."""
        return {**{k: getattr(self, k) for k in USER}, **self.research.__dict__}

    @property
    def effective_density(self) -> float:
        return 1.0 if self.selection == "dense" else (self.density or DEFAULT_DENSITY)

    def prefix_bound(self, kv_bytes: int) -> int:
        """The kept prefixes' byte bound (0: none kept), given one KV cache's bytes at max_context."""
        if not self.prefix_cache:
            return 0
        if self.prefix_cache_bytes is None:
            return kv_bytes
        if isinstance(self.prefix_cache_bytes, str):
            return parse_budget(self.prefix_cache_bytes, 1) or 0
        return self.prefix_cache_bytes

    @property
    def torch_dtype(self) -> torch.dtype:
        from flashlm.io.writer import TORCH_DTYPES

        return TORCH_DTYPES[self.dtype]


USER = tuple(f.name for f in fields(EngineConfig) if f.name != "research")

# -- validation: every rule here, run as a record is made --------------------------------------


def _check_research(r: Research) -> None:
    if not _int(r.window) or r.window < 1:
        raise ConfigError(f"window must be an int >= 1 (tokens), got {r.window!r}")
    for name in ("eviction", "compute"):
        choices = describe(Research, name).choices
        if getattr(r, name) not in choices:
            raise ConfigError(f"{name} {getattr(r, name)!r} must be {one_of(choices)}")
    if not _int(r.lookahead) or r.lookahead not in (0, 1):
        raise ConfigError(f"lookahead must be 0 (serial) or 1 (prefetch one layer ahead), got {r.lookahead!r}")
    for name in ("reuse", "page_cache"):
        if not isinstance(getattr(r, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(r, name)!r}")
    backends = describe(Research, "io_backend").choices
    if isinstance(r.io_backend, str) and r.io_backend not in backends:
        raise ConfigError(f"io_backend {r.io_backend!r} must be one of {backends}")
    if not isinstance(r.io_backend, str | Backend):
        raise ConfigError(f"io_backend must be one of {backends} or a flashlm.io.backend.Backend, "
                          f"got {r.io_backend!r}")
    if not _int(r.in_flight) or not 1 <= r.in_flight <= 256:
        raise ConfigError(f"in_flight must be an int in [1, 256], got {r.in_flight!r}")
    if r.cache_gamma is not None and not _fraction(r.cache_gamma):
        raise ConfigError(f"cache_gamma must be a number in (0, 1] (1: no masking), got {r.cache_gamma!r}")


def _check_user(c: EngineConfig) -> None:
    """The user's fields, and the rules across both records (the research ones are checked by
    Research itself, before)."""
    if c.dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype {c.dtype!r} is not one of {list(COMPUTE_DTYPES)}")
    if c.store_dtype is not None and c.store_dtype not in STORE_DTYPES:
        raise ConfigError(f"store_dtype {c.store_dtype!r} is not one of {list(STORE_DTYPES)}")
    import torch

    try:
        dev = torch.device(c.device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {c.device!r} is not a torch device ({e}); use cpu, cuda or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {c.device!r}: CUDA is not available in this torch build/machine; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {c.device!r}: MPS is not available here; use cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {c.device!r}: only cpu, cuda and mps are supported")
    if c.max_context is not None and (not _int(c.max_context) or c.max_context < 2):
        raise ConfigError(f"max_context must be an int >= 2, got {c.max_context!r}")
    if c.num_threads is not None and (not _int(c.num_threads) or c.num_threads < 1):
        raise ConfigError(f"num_threads must be a positive int, got {c.num_threads!r}")
    for name in ("ffn", "selection"):
        choices = describe(EngineConfig, name).choices
        if getattr(c, name) not in choices:
            raise ConfigError(f"{name} {getattr(c, name)!r} must be {one_of(choices)}")
    if c.density is not None and not _fraction(c.density):
        raise ConfigError(f"density must be a number in (0, 1], got {c.density!r}")
    if c.selection == "dense" and c.density not in (None, 1, 1.0):
        raise ConfigError("selection 'dense' computes every neuron; choose gate/shadow/predictor for density < 1")
    if c.research.cache_gamma is not None and c.selection not in ("griffin", "sign"):
        raise ConfigError(f"cache_gamma masks griffin's or sign's scores; it needs selection 'griffin' or 'sign', "
                          f"not {c.selection!r}")
    if c.selection in ("griffin", "sign") and c.ffn != "flash":
        raise ConfigError(f"selection {c.selection!r} reads its set from the store: it needs ffn='flash' (not --ram)")
    if not isinstance(c.prefix_cache, bool):
        raise ConfigError(f"prefix_cache must be True or False, got {c.prefix_cache!r}")
    if c.prefix_cache_bytes is not None and not (_int(c.prefix_cache_bytes) and c.prefix_cache_bytes >= 0
                                                 or isinstance(c.prefix_cache_bytes, str)):
        raise ConfigError(f"prefix_cache_bytes must be bytes (an int >= 0), a size string like '512MiB', or None "
                          f"(one KV cache at max_context), got {c.prefix_cache_bytes!r}")
    if isinstance(c.prefix_cache_bytes, str):
        try:
            parse_budget(c.prefix_cache_bytes, 1)
        except ConfigError:
            raise ConfigError(f"prefix_cache_bytes {c.prefix_cache_bytes!r} is not understood; use bytes, "
                              f"e.g. '512MiB' or 0 (keep none)") from None
    parse_budget(c.memory_budget, 1)  # its form; a fraction becomes bytes at open, of the model's size
    if not _int(c.trace_max_bytes) or c.trace_max_bytes < 4096:
        raise ConfigError(f"trace_max_bytes must be an int >= 4096, got {c.trace_max_bytes!r}")
    if c.trace is not None and not isinstance(c.trace, str | os.PathLike):
        raise ConfigError(f"trace must be a file path or None, got {c.trace!r}")
