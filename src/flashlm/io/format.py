"""The flash store's on-disk format: constants, layout records and their validation.

A store is a directory::

    manifest.json          what is where (this module's `Manifest`), with its own checksum
    resident.safetensors   embeddings, norms, attention, lm_head, FFN biases (transformers key names)
    ffn.bin                a 4 KiB header, then per layer `n_neurons` bundles of `stride` bytes
    tokenizer/             the tokenizer's files (optional: token-level stores work without)

A *bundle* is everything one FFN neuron needs, contiguous: for gated (SwiGLU / GeGLU) models
gate row i, up row i and down column i; for OPT-style models fc1 row i and fc2 column i. Each
part is `hidden_size` elements of the store dtype; the bundle is zero-padded to `stride`, a
multiple of `block_size`, so any run of bundles can be read with O_DIRECT straight into an
aligned buffer. Layer regions start on 4 KiB boundaries.

This module knows bytes, not transformers: it is shared by the writer, the reader and
`flashlm verify`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from flashlm.errors import CheckpointFormatError, StoreVersionError
from flashlm.kernels.formats import GROUP, QUANT_DTYPES, bundle_layout, default_parts, kernel_format

FORMAT_NAME = "flashlm-store"
FORMAT_VERSION = 2  # 2: quantised stores (dtype int8 / q4 / q4d8, `Manifest.quantized`); 1: float stores only
READABLE_VERSIONS = (1, 2)  # a version-1 store is a float store (no quantised rows)
MANIFEST_NAME = "manifest.json"
RESIDENT_NAME = "resident.safetensors"
FFN_NAME = "ffn.bin"
CRC_NAME = "ffn.crc32"  # uint32 little-endian per bundle (its unpadded bytes), layer-major
TOKENIZER_DIR = "tokenizer"
NEURON_ORDER_KEY = "neuron_order"  # Manifest.extra[NEURON_ORDER_KEY]: how the store's neurons are ordered

# ffn.bin header: magic, format version, number of layers, block size, store id (16 bytes).
FFN_MAGIC = b"FLASHLM-FFN\x00"
FFN_HEADER_STRUCT = struct.Struct("<12sIII16s")
FFN_HEADER_BYTES = 4096  # every allowed block size divides it, so layer regions stay aligned
ALLOWED_BLOCK_SIZES = (512, 1024, 2048, 4096)
REGION_ALIGN = 4096

DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Quantised stores hold their rows in a kernel format (`flashlm.kernels.formats`: the group size,
# the row and bundle bytes and the store dtype of each format are defined there).
STORE_DTYPES = (*DTYPE_SIZES, *QUANT_DTYPES)


def bundle_nbytes(parts: int, hidden: int, dtype: str, names: tuple[str, ...] | None = None) -> int:
    """Bytes of real data in a bundle of `parts` parts of `hidden` values (without padding). Float:
    the parts' rows one after another; quantised: its `flashlm.kernels.formats.bundle_layout`
    (`names`, default `default_parts(parts)`, say which part is a q4d8 store's q8 down part)."""
    if kernel_format(dtype) is not None:
        return bundle_layout(dtype, hidden, tuple(names or default_parts(parts))).nbytes
    return parts * hidden * DTYPE_SIZES[dtype]


# Resident tensors that are not transformers keys are named by the models package:
# flashlm.models.base.PERMUTATION_KEY ("flashlm.ffn_permutation.{layer}", int32: physical slot -> neuron)
# and flashlm.models.selectors.SELECTOR_KEY (calibrated selectors).


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """A file of the store: its name relative to the store root, size and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class LayerLayout:
    """Where one layer's bundles live in ffn.bin."""

    offset: int  # byte offset of bundle 0; a multiple of REGION_ALIGN
    n_neurons: int
    sha256: str  # of the region's n_neurons * stride bytes
    permuted: bool = False  # True: resident holds this layer's neuron permutation


@dataclass(frozen=True)
class FFNLayout:
    """Geometry of ffn.bin, enough to read any bundle without knowing the model."""

    file: FileEntry
    block_size: int
    parts: tuple[str, ...]  # e.g. ("gate", "up", "down") or ("fc1", "fc2")
    hidden_size: int  # elements per part
    dtype: str
    layers: tuple[LayerLayout, ...]
    # Per-bundle CRC32s: checked on every read, so a flipped bit is caught when its neuron is
    # read, not only by `flashlm verify`. None in a store without them (an older flashlm wrote it).
    crc32: FileEntry | None = None

    @property
    def quant_format(self) -> str | None:
        """The kernel row format of a quantised store ("q8", "q4"; "q4" for q4d8, whose bundles'
        down parts are q8: `flashlm.kernels.formats.bundle_layout`), None for a float store."""
        return kernel_format(self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element of a float store (a quantised one has no whole-byte element)."""
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"a {self.dtype} store has no per-element size; use bundle_bytes")
        return DTYPE_SIZES[self.dtype]

    @property
    def bundle_bytes(self) -> int:
        """Bytes of real data in a bundle (without padding): `bundle_nbytes`."""
        return bundle_nbytes(len(self.parts), self.hidden_size, self.dtype, self.parts)

    @property
    def stride(self) -> int:
        """Bytes from one bundle to the next: bundle_bytes rounded up to block_size."""
        return round_up(self.bundle_bytes, self.block_size)

    def bundle_offset(self, layer: int, neuron: int) -> int:
        return self.layers[layer].offset + neuron * self.stride


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    created_by: str
    store_id: str  # uuid4 hex, also written in ffn.bin's header: ties the two files together
    model_type: str
    config: dict[str, Any]  # the transformers config as a dict
    dtype: str
    source: dict[str, Any]  # provenance: kind, path, built-in name
    resident: FileEntry
    ffn: FFNLayout
    tokenizer: tuple[FileEntry, ...] | None  # files under tokenizer/, or None
    predictors: dict[str, Any] | None = None  # filled by `flashlm calibrate`
    extra: dict[str, Any] = field(default_factory=dict)
    # Resident weights stored quantised, name -> kernel format ("q8" / "q4"): their tensors are
    # NAME.qdata, NAME.qscales and (q4) NAME.qmins in resident.safetensors (format 2).
    quantized: dict[str, str] = field(default_factory=dict)

    # -- serialisation -------------------------------------------------------------------

    def to_json(self) -> str:
        body = asdict(self)
        body["manifest_sha256"] = _body_checksum(body)
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        fix = "re-run `flashlm convert` to rebuild the store"
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{where}: manifest is not valid JSON ({e}); {fix}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise CheckpointFormatError(f"{where}: not a flashlm store manifest; {fix}")
        version = body.get("format_version")
        if version not in READABLE_VERSIONS:
            age = "an older" if isinstance(version, int) and version < FORMAT_VERSION else "a newer"
            raise StoreVersionError(
                f"{where}: store format {version!r} was written by {age} flashlm; this flashlm reads "
                f"formats {', '.join(map(str, READABLE_VERSIONS))}: {fix} (or use the flashlm that wrote it)"
            )
        stated = body.pop("manifest_sha256", None)
        if stated != _body_checksum(body):
            raise CheckpointFormatError(f"{where}: manifest checksum mismatch (edited or damaged); {fix}")
        return _typed(cls, body, "", where)

    def validate(self, where: str) -> None:
        """Check the internal consistency of the layout (not the files: see store.py)."""
        fix = "re-run `flashlm convert`"
        f = self.ffn
        if f.hidden_size < 1 or not f.parts or not f.layers:
            raise CheckpointFormatError(f"{where}: ffn layout has hidden_size {f.hidden_size}, parts {list(f.parts)}, "
                                        f"{len(f.layers)} layers; {fix}")
        for entry in (self.resident, f.file, *([f.crc32] if f.crc32 else []), *(self.tokenizer or ())):
            if entry.size < 0:
                raise CheckpointFormatError(f"{where}: {entry.path} has size {entry.size}; {fix}")
        if f.block_size not in ALLOWED_BLOCK_SIZES:
            raise CheckpointFormatError(f"{where}: block_size {f.block_size} not in {ALLOWED_BLOCK_SIZES}; {fix}")
        if f.dtype not in STORE_DTYPES or f.dtype != self.dtype:
            raise CheckpointFormatError(f"{where}: unknown or inconsistent dtype {f.dtype!r}; {fix}")
        if f.quant_format is not None and (f.hidden_size % GROUP or self.format_version < 2):
            raise CheckpointFormatError(f"{where}: a {f.dtype} store needs format 2 and a hidden size that is a "
                                        f"multiple of {GROUP}; {fix}")
        bad = {k: v for k, v in self.quantized.items() if v not in QUANT_DTYPES.values()}
        if bad:
            raise CheckpointFormatError(f"{where}: resident tensors in unknown formats {bad}; {fix}")
        end = FFN_HEADER_BYTES
        for i, layer in enumerate(f.layers):
            if layer.offset % REGION_ALIGN or layer.offset < end or layer.n_neurons <= 0:
                raise CheckpointFormatError(f"{where}: layer {i} region at {layer.offset} is misplaced; {fix}")
            end = layer.offset + layer.n_neurons * f.stride
        if end > f.file.size:
            raise CheckpointFormatError(
                f"{where}: ffn layout ends at byte {end} but {f.file.path} is {f.file.size} bytes; {fix}"
            )
        n_bundles = sum(layer.n_neurons for layer in f.layers)
        if f.crc32 is not None and f.crc32.size != 4 * n_bundles:
            raise CheckpointFormatError(f"{where}: {f.crc32.path} holds {f.crc32.size} bytes, not 4 per bundle; {fix}")


def _typed(tp: Any, value: Any, name: str, where: str) -> Any:
    """`value` (parsed JSON) as type `tp` (a record of this module, or a field type of one),
    checked all the way down: a field of the wrong type is a CheckpointFormatError naming it, not
    a TypeError when it is first used."""
    def bad(what: str) -> CheckpointFormatError:
        field = f"field {name}" if name else "body"
        return CheckpointFormatError(f"{where}: manifest {field} {what}; re-run `flashlm convert` to rebuild the store")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"is {type(value).__name__}, not an object")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(known))
        missing = [n for n, f in known.items() if n not in value and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if unknown or missing:
            raise bad(f"has unexpected fields {unknown}" if unknown else f"lacks {missing}")
        return tp(**{k: _typed(hints[k], v, f"{name}.{k}" if name else k, where) for k, v in value.items()})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(inner, value, name, where)
    if origin is tuple:  # tuple[X, ...]: a JSON list
        if not isinstance(value, list):
            raise bad(f"is {value!r}, not a list")
        return tuple(_typed(args[0], v, f"{name}[{i}]", where) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad(f"is {value!r}, not an object")
        return value
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise bad(f"is {value!r}, not {'an' if tp is int else 'a'} {tp.__name__}")
    return value


def _body_checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return sha256_bytes(canonical)


def pack_ffn_header(n_layers: int, block_size: int, store_id: str) -> bytes:
    head = FFN_HEADER_STRUCT.pack(FFN_MAGIC, FORMAT_VERSION, n_layers, block_size, bytes.fromhex(store_id))
    return head.ljust(FFN_HEADER_BYTES, b"\x00")


def check_ffn_header(data: bytes, manifest: Manifest, where: str) -> None:
    fix = "re-run `flashlm convert` to rebuild the store"
    if len(data) < FFN_HEADER_STRUCT.size:
        raise CheckpointFormatError(f"{where}: ffn file is shorter than its header; {fix}")
    magic, version, n_layers, block, sid = FFN_HEADER_STRUCT.unpack_from(data)
    if magic != FFN_MAGIC:
        raise CheckpointFormatError(f"{where}: ffn file has no flashlm header (bad magic); {fix}")
    if version != manifest.format_version:
        raise StoreVersionError(f"{where}: ffn file format {version}, its manifest says {manifest.format_version}; {fix}")
    if (n_layers, block, sid.hex()) != (len(manifest.ffn.layers), manifest.ffn.block_size, manifest.store_id):
        raise CheckpointFormatError(f"{where}: ffn file does not belong to this manifest; {fix}")
