"""The streaming safetensors writer: the bytes `safetensors.torch.save_file` writes, whatever
order the tensors come in, each tensor held only while it is written; the encode seam."""

from __future__ import annotations

import gc
import os
import random
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashlm.errors import ConfigError
from flashlm.io.store import FlashStore
from flashlm.io.writer import cast_encoder, write_safetensors, write_store

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.float16, torch.bfloat16, torch.int32,
          torch.uint32, torch.float32, torch.float64, torch.int64, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]
NAMES = ["a", "b.weight", "Zed", "model.layers.10.x", "model.layers.2.x", 'ünï\n"q\\', "e", "\x01ctl", "emp", "é"]


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, name in enumerate(NAMES):
        d = DTYPES[i % len(DTYPES)]
        shape = [(3, 5), (7,), (), (2, 0), (4, 4, 2)][i % 5]
        x = torch.rand(shape, generator=g) * 10
        out[name] = x > 5 if d == torch.bool else x.to(d)
    for d in DTYPES:  # every dtype, so the file's dtype order is exercised in full
        out[f"t.{d}"] = torch.full((3,), 2).to(d)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_equal_save_file_in_any_order(tmp_path, seed):
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    items = list(tensors.items())
    random.Random(seed).shuffle(items)
    write_safetensors(tmp_path / "new.safetensors", iter(items))
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "new.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    assert sorted(os.listdir(tmp_path)) == ["new.safetensors", "ref.safetensors"]  # the spool is gone


def test_empty_file_equals_save_file(tmp_path):
    save_file({}, str(tmp_path / "ref"))
    write_safetensors(tmp_path / "new", iter(()))
    assert (tmp_path / "new").read_bytes() == (tmp_path / "ref").read_bytes() == b"\x08" + bytes(7) + b"{}      "


@pytest.mark.parametrize("made_in", [torch.float32, torch.float16])  # float16: the cast is a no-op
def test_each_tensor_is_freed_before_the_next_is_made(tmp_path, made_in):
    alive: list[weakref.ref] = []  # to each tensor's storage: alive while anything holds its bytes
    held_when_made: list[int] = []

    def stream():
        for i in range(6):
            gc.collect()
            held_when_made.append(sum(r() is not None for r in alive))
            t = torch.full((256, 256), float(i), dtype=made_in)
            alive.append(weakref.ref(t.untyped_storage()))
            yield f"w{i}", t
            del t

    write_safetensors(tmp_path / "s", stream(), cast_encoder("float16"))
    assert held_when_made == [0] * 6, held_when_made  # nothing from the stream is kept by the writer
    back = load_file(str(tmp_path / "s"))
    assert all(back[f"w{i}"].dtype == torch.float16 and back[f"w{i}"].eq(i).all() for i in range(6))


def test_encoder_seam_replaces_a_tensor_by_its_encoding(tmp_path):
    """An encoder may store a tensor as several (an int8 weight and its scales) under its own names."""

    def int8_rows(name, t):
        if name != "lm_head.weight":
            return cast_encoder("float32")(name, t)
        scale = t.abs().amax(dim=1, keepdim=True) / 127
        return [(name + ".int8", torch.round(t / scale).to(torch.int8)), (name + ".scale", scale)]

    w = torch.randn(8, 16)
    write_store(tmp_path / "s", model_type="llama", config={}, dtype="float32", source={},
                resident=iter([("lm_head.weight", w), ("model.norm.weight", torch.ones(16))]),
                ffn_layers=iter([torch.zeros(4, 3, 16)]), n_layers=1, parts=("gate", "up", "down"), hidden_size=16,
                encode=int8_rows)
    resident = FlashStore.open(tmp_path / "s").load_resident()
    assert sorted(resident) == ["lm_head.weight.int8", "lm_head.weight.scale", "model.norm.weight"]
    assert torch.allclose(resident["lm_head.weight.int8"].float() * resident["lm_head.weight.scale"], w, atol=0.02)


def test_bad_streams_leave_nothing(tmp_path):
    def dies():
        yield "a", torch.ones(3)
        raise RuntimeError("source died mid-way")

    common = dict(model_type="llama", config={}, dtype="float32", source={}, ffn_layers=iter([]), n_layers=0,
                  parts=("a",), hidden_size=3)
    with pytest.raises(RuntimeError, match="mid-way"):
        write_store(tmp_path / "s", resident=dies(), **common)
    with pytest.raises(ConfigError, match="given twice"):
        write_store(tmp_path / "s", resident=iter([("a", torch.ones(2)), ("a", torch.ones(2))]), **common)
    with pytest.raises(ConfigError, match="cannot store"):
        write_store(tmp_path / "s", resident=iter([("c", torch.ones(2, dtype=torch.complex64))]), **common)
    assert os.listdir(tmp_path) == []
