"""The store's bytes and its checks: what the writer puts on disk, exactly, and every way a
damaged store is refused on open with a named error."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

from flashlm.errors import CheckpointFormatError, ConfigError, StoreExistsError, StoreVersionError
from flashlm.io.format import FFN_HEADER_BYTES, FFN_MAGIC, FORMAT_VERSION, MANIFEST_NAME, _body_checksum
from flashlm.io.store import FlashStore
from flashlm.io.writer import TORCH_DTYPES, write_store

D, N, LAYERS = 8, 5, 2


def tiny_rows(layer: int, parts: int = 3) -> torch.Tensor:
    # values exact in every dtype (small integers and halves), distinct per (layer, neuron, part, k)
    v = torch.arange(N * parts * D, dtype=torch.float32).reshape(N, parts, D)
    return (v + 100 * layer) / 2


def write_tiny(path, dtype="float32", block_size=512, parts=("gate", "up", "down"), **kw):
    return write_store(
        path,
        model_type="llama",
        config={"model_type": "llama", "hidden_size": D},
        dtype=dtype,
        source={"kind": "test"},
        resident={"model.embed_tokens.weight": torch.ones(4, D), "flashlm.ffn_permutation.0": torch.arange(N, dtype=torch.int32)},
        ffn_layers=(tiny_rows(i, len(parts)) for i in range(LAYERS)),
        n_layers=LAYERS,
        parts=parts,
        hidden_size=D,
        block_size=block_size,
        **kw,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("block_size", [512, 4096])
def test_exact_bundle_bytes(tmp_path, dtype, block_size):
    m = write_tiny(tmp_path / "s", dtype, block_size)
    raw = (tmp_path / "s" / "ffn.bin").read_bytes()
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    bundle = 3 * D * itemsize
    stride = -(-bundle // block_size) * block_size
    assert (m.ffn.bundle_bytes, m.ffn.stride) == (bundle, stride)
    magic, version, n_layers, bs, sid = struct.unpack_from("<12sIII16s", raw)
    assert (magic, version, n_layers, bs, sid.hex()) == (FFN_MAGIC, FORMAT_VERSION, LAYERS, block_size, m.store_id)
    assert raw[struct.calcsize("<12sIII16s") : FFN_HEADER_BYTES] == bytes(FFN_HEADER_BYTES - 40)  # 12+4+4+4+16 header bytes
    for layer in range(LAYERS):
        lay = m.ffn.layers[layer]
        assert lay.offset % 4096 == 0
        src = tiny_rows(layer).to(TORCH_DTYPES[dtype])
        for i in range(N):
            at = lay.offset + i * stride
            want = src[i].contiguous().view(torch.uint8).numpy().tobytes()  # gate row, up row, down col
            assert raw[at : at + bundle] == want
            assert raw[at + bundle : at + stride] == bytes(stride - bundle)  # zero padding
    assert len(raw) == m.ffn.file.size == m.ffn.layers[-1].offset + N * stride
    # ffn.crc32: one little-endian CRC32 per bundle (its unpadded bytes), layer-major
    crcs = (tmp_path / "s" / "ffn.crc32").read_bytes()
    want = b"".join(struct.pack("<I", zlib.crc32(raw[lay.offset + i * stride: lay.offset + i * stride + bundle]))
                    for lay in m.ffn.layers for i in range(N))
    assert crcs == want and m.ffn.crc32.size == len(want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_rows(tmp_path, dtype):
    write_tiny(tmp_path / "s", dtype)
    store = FlashStore.open(tmp_path / "s")
    for layer in range(LAYERS):
        rows = store.layer_rows(store.read_layer(layer))
        assert rows.dtype == TORCH_DTYPES[dtype] and rows.shape == (N, 3, D)
        assert torch.equal(rows.float(), tiny_rows(layer))
    assert store.verify() == []
    res = store.load_resident()
    assert res["flashlm.ffn_permutation.0"].dtype == torch.int32


def test_refuses_existing_without_force(tmp_path):
    write_tiny(tmp_path / "s")
    before = (tmp_path / "s" / MANIFEST_NAME).read_text()
    with pytest.raises(StoreExistsError, match="--force"):
        write_tiny(tmp_path / "s")
    assert (tmp_path / "s" / MANIFEST_NAME).read_text() == before
    write_tiny(tmp_path / "s", force=True)
    assert (tmp_path / "s" / MANIFEST_NAME).read_text() != before  # a new store id
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary or old directories left


def test_failed_write_leaves_nothing(tmp_path):
    def bad_layers():
        yield tiny_rows(0)
        raise RuntimeError("source died mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        write_store(tmp_path / "s", model_type="llama", config={}, dtype="float32", source={}, resident={},
                    ffn_layers=bad_layers(), n_layers=2, parts=("a", "b", "c"), hidden_size=D)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ConfigError, match="dtype"):
        write_tiny(tmp_path / "s", dtype="int3")
    with pytest.raises(ConfigError, match="block size"):
        write_tiny(tmp_path / "s", block_size=1000)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def store_dir(tmp_path):
    write_tiny(tmp_path / "s")
    return tmp_path / "s"


def _rewrite_manifest(store_dir, edit):
    """Edit the manifest and re-seal its checksum, as a buggy or hostile writer would."""
    body = json.loads((store_dir / MANIFEST_NAME).read_text())
    body.pop("manifest_sha256")
    edit(body)
    body["manifest_sha256"] = _body_checksum(body)
    (store_dir / MANIFEST_NAME).write_text(json.dumps(body))


def test_open_errors(store_dir, tmp_path):
    with pytest.raises(CheckpointFormatError, match="no such store"):
        FlashStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="not a flashlm store"):
        FlashStore.open(tmp_path / "empty")


def test_truncated_ffn(store_dir):
    ffn = store_dir / "ffn.bin"
    os.truncate(ffn, ffn.stat().st_size - 100)
    with pytest.raises(CheckpointFormatError, match=r"ffn.bin is \d+ bytes, manifest says \d+"):
        FlashStore.open(store_dir)


def test_bit_flip_found_by_layer_checksum_and_verify(store_dir):
    store = FlashStore.open(store_dir)
    at = store.manifest.ffn.layers[1].offset + 7
    with open(store_dir / "ffn.bin", "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    store = FlashStore.open(store_dir)  # sizes still agree: open is cheap and passes
    store.read_layer(0)
    with pytest.raises(CheckpointFormatError, match="layer 1 bundles fail their checksum"):
        store.read_layer(1)
    assert any("ffn.bin: checksum mismatch" in p for p in store.verify())


def test_edited_manifest(store_dir):
    text = (store_dir / MANIFEST_NAME).read_text()
    (store_dir / MANIFEST_NAME).write_text(text.replace('"float32"', '"float16"', 1))
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        FlashStore.open(store_dir)
    (store_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        FlashStore.open(store_dir)


@pytest.mark.parametrize("version,word", [(0, "older"), (FORMAT_VERSION + 1, "newer")])
def test_wrong_version(store_dir, version, word):
    _rewrite_manifest(store_dir, lambda b: b.update(format_version=version))
    with pytest.raises(StoreVersionError, match=f"store format {version} was written by an? {word} flashlm.*flashlm convert"):
        FlashStore.open(store_dir)


def test_ffn_header_mismatch(store_dir):
    with open(store_dir / "ffn.bin", "r+b") as f:
        f.write(b"NOTFLASHLM!!")
    with pytest.raises(CheckpointFormatError, match="bad magic"):
        FlashStore.open(store_dir)


def test_manifest_paths_cannot_leave_the_store(store_dir):
    _rewrite_manifest(store_dir, lambda b: b["resident"].update(path="../../etc/passwd"))
    with pytest.raises(CheckpointFormatError, match="outside the store"):
        FlashStore.open(store_dir)


def test_layout_past_end_of_file(store_dir):
    _rewrite_manifest(store_dir, lambda b: b["ffn"]["layers"][-1].update(n_neurons=N + 50))
    with pytest.raises(CheckpointFormatError, match="ffn layout ends at byte"):
        FlashStore.open(store_dir)


def test_read_layer_is_aligned(store_dir):
    buf = FlashStore.open(store_dir).read_layer(0)
    assert buf.ctypes.data % 4096 == 0 and buf.dtype == np.uint8
