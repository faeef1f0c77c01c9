"""Bad input through the `flashlm` command: each is one line on stderr naming the problem and
the fix, exit 1, no traceback; and nothing is installed or downloaded behind the user's back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from flashlm.cli import main


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail the test if anything is run (apt-get, pip ...)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args!r}")

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


# -- side effects nobody asked for ---------------------------------------------------------------


def test_bench_io_without_fio_measures_the_reader_alone_and_installs_nothing(monkeypatch, tmp_path, no_subprocess):
    """A missing fio is a note in the report, never a failure (and nothing is installed)."""
    from flashlm.bench.io import find_fio

    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "fio" else real(name, *a, **k))
    monkeypatch.delenv("FLASHLM_FIO", raising=False)
    path, note = find_fio()
    assert path is None and "fio not found" in note and "FLASHLM_FIO" in note and "apt-get install fio" in note
    monkeypatch.setenv("FLASHLM_FIO", str(tmp_path / "nowhere" / "fio"))
    path, note = find_fio()
    assert path is None and "fio not found" in note and "nowhere" in note
    exe = tmp_path / "fio"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("FLASHLM_FIO", str(exe))
    assert find_fio() == (str(exe), f"fio found at {exe} ($FLASHLM_FIO)")
    assert find_fio(False)[0] is None


def test_calibrate_without_its_text_says_what_to_install_and_downloads_nothing(llama_store, monkeypatch, capsys,
                                                                              tmp_path, no_subprocess):
    from flashlm.calibration import data

    _, store = llama_store
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "_installed_test_data", lambda: None)  # as if gensim had no test data
    data.wiki_articles.cache_clear()
    try:
        one_line_error(["calibrate", str(store), "--quiet"], capsys, "pip install 'gensim==4.4.0'", "--text FILE")
    finally:
        data.wiki_articles.cache_clear()
    assert not (tmp_path / "home" / "data").exists()


# -- traces --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace_file(llama_store, tmp_path_factory):
    _, store = llama_store
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    assert main(["run", "--model", str(store), "--raw", "-n", "3", "-q", "--json", "--trace", str(path),
                 "--selection", "gate", "--density", "0.5", "The quick"]) == 0
    return path


@pytest.mark.parametrize("line,needle", [
    ("[1, 2, 3]", "a trace line is a JSON object, this is list"),
    ('"read"', "a trace line is a JSON object, this is str"),
    ('{"ev": "wait", "token": "seven", "rid": null, "layer": 0, "start": 0.0, "end": 1.0}',
     "token 'seven' is not an integer"),
    ('{"ev": "wait", "token": 1, "rid": null, "layer": 0, "start": "0.5", "end": 1.0}',
     "wait field start is '0.5', not a number"),
    ('{"ev": "read", "token": 1, "rid": null}', "lacks"),
])
def test_a_malformed_trace_line_is_one_line(trace_file, tmp_path, capsys, line, needle):
    bad = tmp_path / "bad.jsonl"
    text = trace_file.read_text().splitlines()
    bad.write_text("\n".join([*text[:3], line, *text[3:]]) + "\n")
    one_line_error(["trace", "report", str(bad)], capsys, f"{bad}:4", needle)
    assert main(["trace", "report", str(trace_file)]) == 0  # the good one reads


def test_trace_report_without_matplotlib_says_what_to_install(trace_file, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    one_line_error(["trace", "report", str(trace_file), "--out", str(tmp_path / "r")], capsys,
                   "needs matplotlib", "pip install 'flashlm[bench]'")
    assert not (tmp_path / "r").exists()
    assert main(["trace", "report", str(trace_file)]) == 0  # the table needs no matplotlib


# -- damaged stores ------------------------------------------------------------------------------


def rewrite_manifest(store: Path, edit) -> None:
    """Edit the manifest and re-seal its checksum, as a buggy or hostile writer would."""
    from flashlm.io.format import MANIFEST_NAME, _body_checksum

    body = json.loads((store / MANIFEST_NAME).read_text())
    body.pop("manifest_sha256")
    edit(body)
    body["manifest_sha256"] = _body_checksum(body)
    (store / MANIFEST_NAME).write_text(json.dumps(body))


@pytest.fixture
def store_copy(llama_store, tmp_path):
    _, store = llama_store
    return Path(shutil.copytree(store, tmp_path / "store"))


@pytest.mark.parametrize("edit,needle", [
    (lambda b: b["ffn"]["layers"][0].update(n_neurons="160"), "field ffn.layers[0].n_neurons is '160', not an int"),
    (lambda b: b["ffn"].update(hidden_size=64.0), "field ffn.hidden_size is 64.0, not an int"),
    (lambda b: b["ffn"].update(block_size=True), "field ffn.block_size is True, not an int"),
    (lambda b: b["ffn"].update(parts="gate"), "field ffn.parts is 'gate', not a list"),
    (lambda b: b.update(resident="resident.safetensors"), "field resident is str, not an object"),
    (lambda b: b["resident"].update(size="12"), "field resident.size is '12', not an int"),
    (lambda b: b.update(config=[1]), "field config is [1], not an object"),
    (lambda b: b.update(tokenizer={}), "field tokenizer is {}, not a list"),
    (lambda b: b["ffn"].update(crc32=7), "field ffn.crc32 is int, not an object"),
    (lambda b: b["ffn"].update(hidden_size=0), "hidden_size 0"),
    (lambda b: b["ffn"].update(extra_field=1), "field ffn has unexpected fields ['extra_field']"),
])
def test_a_wrongly_typed_manifest_field_is_one_line(store_copy, capsys, edit, needle):
    rewrite_manifest(store_copy, edit)
    one_line_error(["verify", str(store_copy)], capsys, needle, "re-run `flashlm convert`")
    one_line_error(["run", "--model", str(store_copy), "-q", "hi"], capsys, needle)


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.pop("num_attention_heads"), "llama: the model config has no 'num_attention_heads'"),
    (lambda c: c.pop("vocab_size"), "llama: the model config has no 'vocab_size'"),
    (lambda c: c.update(num_attention_heads=0), "llama: config num_attention_heads=0 must be a positive int"),
    (lambda c: c.update(num_key_value_heads=-2), "llama: config num_key_value_heads=-2 must be a positive int"),
    (lambda c: c.update(hidden_size="64"), "llama: config hidden_size='64' must be a positive int"),
    (lambda c: c.update(rope_parameters=[1]), "llama: the model config has a value of the wrong type"),
    (lambda c: c.update(intermediate_size=161), "its FFN layout (2 layers of 160 neurons"),
    (lambda c: c.update(num_hidden_layers=3), "is not its model's (3 layers of 160 neurons"),
])
def test_a_config_the_model_cannot_be_built_from_is_one_line(store_copy, capsys, edit, needle):
    rewrite_manifest(store_copy, lambda b: edit(b["config"]))
    one_line_error(["run", "--model", str(store_copy), "-q", "hi"], capsys, needle)


def reseal_resident(store: Path, edit) -> None:
    """Rewrite resident.safetensors through `edit` and record its new size and checksum."""
    import torch  # noqa: F401
    from safetensors.torch import load_file, save_file

    from flashlm.io.format import file_sha256

    path = store / "resident.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    rewrite_manifest(store, lambda b: b["resident"].update(size=path.stat().st_size, sha256=file_sha256(path)))


@pytest.mark.parametrize("key", ["model.layers.1.input_layernorm.weight", "model.norm.weight",
                                 "model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"])
@pytest.mark.parametrize("ffn", ["flash", "ram"])
def test_a_missing_resident_tensor_is_named_in_one_line(store_copy, capsys, key, ffn):
    reseal_resident(store_copy, lambda t: t.pop(key))
    one_line_error(["run", "--model", str(store_copy), "-q", *(["--ram"] if ffn == "ram" else []), "hi"], capsys,
                   f"resident.safetensors has no tensor '{key}'", "re-run `flashlm convert`")


def test_a_damaged_tokenizer_of_the_right_size_is_one_line(store_copy, capsys):
    path = store_copy / "tokenizer" / "tokenizer.json"
    data = bytearray(path.read_bytes())
    at = data.index(b'"<eos>"') + 2
    data[at] ^= 0x01  # same size, different bytes
    path.write_bytes(bytes(data))
    one_line_error(["run", "--model", str(store_copy), "-q", "hi"], capsys,
                   "tokenizer/tokenizer.json fails its checksum (damaged)", "re-run `flashlm convert`")
    one_line_error(["verify", str(store_copy)], capsys, "tokenizer/tokenizer.json fails its checksum")


@pytest.mark.parametrize("extra", [[], ["--ram"], ["--memory-budget", "1GiB"]])
def test_a_manifest_claiming_more_memory_than_the_machine_has_is_refused_before_allocating(store_copy, capsys,
                                                                                         extra):
    """A sparse ffn.bin satisfies every size check; the model's own shapes and the memory it
    implies are what bound it: ~2x this machine's memory per layer, refused in one line."""
    import os

    from flashlm.io.format import FFN_HEADER_BYTES, round_up
    from flashlm.io.store import FlashStore
    from flashlm.pipeline.budget import machine_memory

    lay = FlashStore.open(store_copy).manifest.ffn
    d_ff = 2 * machine_memory() // lay.stride
    region = round_up(d_ff * lay.stride, 4096)
    size = FFN_HEADER_BYTES + 2 * region
    os.truncate(store_copy / "ffn.bin", size)  # sparse: no blocks are written
    os.truncate(store_copy / "ffn.crc32", 4 * 2 * d_ff)

    def edit(b):
        b["config"]["intermediate_size"] = d_ff
        b["ffn"]["file"]["size"] = size
        b["ffn"]["crc32"]["size"] = 4 * 2 * d_ff
        for i, layer in enumerate(b["ffn"]["layers"]):
            layer.update(n_neurons=d_ff, offset=FFN_HEADER_BYTES + i * region)

    rewrite_manifest(store_copy, edit)
    one_line_error(["run", "--model", str(store_copy), "-q", *extra, "hi"], capsys, "more than this machine's",
                   "set memory_budget (--memory-budget)")
