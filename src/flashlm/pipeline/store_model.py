"""The model a store describes, checked before anything of its size is allocated: its
architecture's args from the manifest's config, the FFN layout against those args (layers,
neurons, parts, width), the resident tensors' in-memory size read from the safetensors header,
and the build, where a resident tensor the architecture needs and the store lacks is named.

A manifest is checksummed, but its checksum proves only that it was not damaged, not that a
writer told the truth: what it says is bounded here by the model's own shapes, and the memory
it implies by the budget (`flashlm.pipeline.budget.check_fits`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flashlm.errors import CheckpointFormatError
from flashlm.io.store import FIX, FlashStore
from flashlm.kernels import QBundles, QRows
from flashlm.models import get_architecture


def model_args(store: FlashStore) -> tuple[Any, Any]:
    """(architecture, args) of the store's model. A config the architecture cannot read is an
    UnsupportedArchitectureError (from the models); an FFN layout that is not that model's is a
    CheckpointFormatError."""
    m = store.manifest
    arch = get_architecture(m.model_type)
    args = arch.Args.from_hf_config(m.config)
    f = m.ffn
    want = (args.n_layers, args.d_ff, tuple(arch.ffn_parts(args)), args.d_model)
    layout = {layer.n_neurons for layer in f.layers}
    got = (len(f.layers), layout.pop() if len(layout) == 1 else sorted(layout), f.parts, f.hidden_size)
    if got != want:
        raise CheckpointFormatError(
            f"{store.path}: its FFN layout ({got[0]} layers of {got[1]} neurons, parts {list(got[2])} of {got[3]}) "
            f"is not its model's ({want[0]} layers of {want[1]} neurons, parts {list(want[2])} of {want[3]}, from "
            f"the config in its manifest); {FIX}")
    return arch, args


def resident_bytes(store: FlashStore, dtype: torch.dtype) -> int:
    """Bytes the resident tensors take in memory with floating-point ones in `dtype`, from the
    safetensors header alone (nothing is loaded). A quantised weight's parts (NAME.qdata,
    .qscales, .qmins) stay as stored: the kernels consume them in that format."""
    path = store._resolve(store.manifest.resident.path)
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = 1
                for n in t.get_shape():
                    numel *= n
                kind = getattr(torch, _TORCH_NAMES.get(t.get_dtype(), "uint8"))
                floating = torch.empty((), dtype=kind).is_floating_point() and not key.endswith(QUANT_PARTS)
                total += numel * (size if floating else torch.empty((), dtype=kind).element_size())
    except (SafetensorError, OSError, ValueError, AttributeError) as e:
        raise CheckpointFormatError(f"{store.path}: resident tensors unreadable ({e}); {FIX}") from None
    return total


QUANT_PARTS = (".qdata", ".qscales", ".qmins")
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def build(store: FlashStore, arch: Any, args: Any, resident: dict[str, torch.Tensor],
          rows: list[torch.Tensor | None]) -> Any:
    """arch.build, with a resident tensor the model needs and the store lacks named."""
    try:
        return arch.build(args, resident, rows)
    except KeyError as e:
        name = _full_name(str(e.args[0]), resident, args.n_layers)
        raise CheckpointFormatError(
            f"{store.path}: resident.safetensors has no tensor {name}, which a {store.manifest.model_type} model of "
            f"this config needs; {FIX}") from None


def _full_name(key: str, resident: dict[str, torch.Tensor], n_layers: int) -> str:
    """The blocks look their tensors up without the layer prefix: find the layer(s) lacking it."""
    layered = re.compile(rf"^(.*\.)(\d+)\.{re.escape(key)}$")
    prefixes: dict[str, set[int]] = {}
    for k in resident:
        if m := layered.match(k):
            prefixes.setdefault(m[1], set()).add(int(m[2]))
    missing = [f"{p}{i}.{key}" for p, have in prefixes.items() for i in range(n_layers) if i not in have]
    return ", ".join(repr(k) for k in missing[:3]) if missing else repr(key)


def check_vocab(store: FlashStore, args: Any, tokenizer: Any | None) -> None:
    """The manifest's vocab_size and eos ids agree with the embedding table and the tokenizer.
    A manifest re-checksummed with `vocab_size` 100 or an `eos_token_id` of 10**9 would run
    silently (ids beyond the vocabulary sampled, EOS never seen): it is refused at open, by name."""
    vocab = args.vocab_size
    eos = store.manifest.config.get("eos_token_id")
    for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
            raise CheckpointFormatError(f"{store.path}: eos_token_id {i!r} in its manifest is outside the vocabulary "
                                        f"[0, {vocab}); {FIX}")
    path = store._resolve(store.manifest.resident.path)
    try:
        with safe_open(str(path), framework="pt") as f:
            rows = {k: f.get_slice(k).get_shape()[0] for k in f.keys()
                    if k.endswith(("embed_tokens.weight", "embed_tokens.weight.qdata"))}
    except (SafetensorError, OSError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointFormatError(f"{store.path}: resident tensors unreadable ({e}); {FIX}") from None
    for k, n in rows.items():
        if n != vocab:
            raise CheckpointFormatError(f"{store.path}: vocab_size {vocab} in its manifest does not match {k} "
                                        f"({n} rows); {FIX}")
    if tokenizer is not None and len(tokenizer) > vocab:
        raise CheckpointFormatError(f"{store.path}: its tokenizer has {len(tokenizer)} tokens but vocab_size is "
                                    f"{vocab}; {FIX}")


def build_model(store: FlashStore, config: Any, arch: Any, args: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model with its resident tensors; with ffn="ram" also every FFN row (read whole,
    checksum-checked), with ffn="flash" none (the layer actors' caches supply them)."""
    dev, dt = torch.device(config.device), config.torch_dtype
    # quantised weights (QRows) stay in their format; float tensors take the compute dtype
    resident = {
        k: (v.to(dev, dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v.to(dev))
        for k, v in store.load_resident().items()
    }
    n = len(store.manifest.ffn.layers)
    if config.ffn == "ram":
        rows: list[Any] = []
        for i in range(n):
            r = store.layer_rows(store.read_layer(i))
            rows.append(r.to(dev) if isinstance(r, QBundles) else r.to(dev, dt))
    else:
        rows = [None] * n
    return build(store, arch, args, resident, rows), resident


def held_bytes(t: torch.Tensor | QRows) -> int:
    """Bytes a resident tensor holds (a quantised one in its own format)."""
    return t.nbytes if isinstance(t, QRows) else t.numel() * t.element_size()
