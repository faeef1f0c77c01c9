"""The converter on real transformers checkpoints: exact bundle bytes per dtype, named errors
for bad sources, nothing left on disk when it fails."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import random_llama, random_opt, save_checkpoint
from flashlm.convert import convert, resolve_store
from flashlm.errors import (
    SourceCheckpointError,
    StoreExistsError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from flashlm.io.store import FlashStore
from flashlm.io.writer import TORCH_DTYPES


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_llama_bundles_equal_source_rows_and_columns(tmp_path, dtype):
    model = random_llama(tie_word_embeddings=True)
    convert(save_checkpoint(model, tmp_path / "c"), tmp_path / "s", dtype=dtype, progress=False)
    store = FlashStore.open(tmp_path / "s")
    assert store.manifest.ffn.parts == ("gate", "up", "down")
    sd = model.state_dict()
    td = TORCH_DTYPES[dtype]
    for layer in range(model.config.num_hidden_layers):
        rows = store.layer_rows(store.read_layer(layer))
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(rows[:, 0], sd[p + "gate_proj.weight"].to(td))
        assert torch.equal(rows[:, 1], sd[p + "up_proj.weight"].to(td))
        assert torch.equal(rows[:, 2], sd[p + "down_proj.weight"].T.to(td))
    resident = store.load_resident()
    assert not any("mlp" in k for k in resident)
    assert "lm_head.weight" not in resident  # tied: stored once
    assert torch.equal(resident["model.embed_tokens.weight"], sd["model.embed_tokens.weight"].to(td))


def test_opt_bundles_and_resident_biases(tmp_path):
    model = random_opt()
    convert(save_checkpoint(model, tmp_path / "c"), tmp_path / "s", dtype="float32", progress=False)
    store = FlashStore.open(tmp_path / "s")
    assert store.manifest.ffn.parts == ("fc1", "fc2")
    sd, rows = model.state_dict(), store.layer_rows(store.read_layer(1))
    assert torch.equal(rows[:, 0], sd["model.decoder.layers.1.fc1.weight"])
    assert torch.equal(rows[:, 1], sd["model.decoder.layers.1.fc2.weight"].T)
    resident = store.load_resident()
    assert torch.equal(resident["model.decoder.layers.1.fc1.bias"], sd["model.decoder.layers.1.fc1.bias"])


def test_bad_sources_leave_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SourceCheckpointError, match="nothing exists"):
        convert(tmp_path / "missing", out, progress=False)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{ this is not json")
    with pytest.raises(SourceCheckpointError, match="cannot read the model config"):
        convert(tmp_path / "garbled", out, progress=False)
    (tmp_path / "noweights").mkdir()
    random_llama().config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(SourceCheckpointError, match="cannot load the weights"):
        convert(tmp_path / "noweights", out, progress=False)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        convert(tmp_path / "gpt2", out, progress=False)
    (tmp_path / "fake.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(SourceCheckpointError):
        convert(tmp_path / "fake.gguf", out, progress=False)
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        resolve_store("smollm9-1t")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no partial directories


def test_existing_out_needs_force(tmp_path):
    src = save_checkpoint(random_llama(), tmp_path / "c")
    convert(src, tmp_path / "s", dtype="float32", progress=False)
    first = FlashStore.open(tmp_path / "s").manifest.store_id
    with pytest.raises(StoreExistsError, match="--force"):
        convert(src, tmp_path / "s", progress=False)
    assert FlashStore.open(tmp_path / "s").manifest.store_id == first
    convert(src, tmp_path / "s", dtype="float16", force=True, progress=False)
    assert FlashStore.open(tmp_path / "s").manifest.dtype == "float16"


def test_force_replaces_only_a_store_or_an_empty_directory(tmp_path):
    """--force must never delete what is not a flashlm store: `convert X ~ --force` once would
    have removed a home directory (the old rmtree of whatever OUT was)."""
    import subprocess
    import sys

    src = save_checkpoint(random_llama(), tmp_path / "c")
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "keep.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine too")
    for out in (home, a_file, src):  # a directory of someone's files, a file, the checkpoint itself
        with pytest.raises(StoreExistsError, match="not a flashlm store|not a directory"):
            convert(src, out, force=True, progress=False)
    r = subprocess.run([sys.executable, "-m", "flashlm", "convert", str(src), str(home), "--force", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a flashlm store" in r.stderr
    assert (home / "notes" / "keep.txt").read_text() == "mine" and a_file.read_text() == "mine too"
    assert (src / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(src, empty, dtype="float32", force=True, progress=False)  # an empty directory may become the store
    first = FlashStore.open(empty).manifest.store_id
    convert(src, empty, dtype="float16", force=True, progress=False)  # and a store may be replaced
    assert FlashStore.open(empty).manifest.store_id != first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no partial or old directories left


def test_pickle_only_checkpoint_is_refused_by_name(tmp_path):
    """A checkpoint whose weights are only pickle (`pytorch_model.bin`) is never unpickled:
    loading a pickle runs whatever code it holds. The error names the file and the way out
    (save it as safetensors), through the CLI in one line; nothing is written."""
    import subprocess
    import sys

    src = save_checkpoint(random_llama(), tmp_path / "c")
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceCheckpointError, match="pytorch_model.bin: save it as safetensors"):
        convert(src, tmp_path / "s", progress=False)
    r = subprocess.run([sys.executable, "-m", "flashlm", "convert", str(src), str(tmp_path / "s"), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "safetensors" in r.stderr
    assert not (tmp_path / "s").exists()
