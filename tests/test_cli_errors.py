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


def test_bench_io_without_fio_says_what_to_install_and_installs_nothing(monkeypatch, capsys, tmp_path,
                                                                        no_subprocess):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "fio" else real(name, *a, **k))
    one_line_error(["bench", "io", "--quick", "--out", str(tmp_path / "io.json"), "--workdir", str(tmp_path / "w")],
                   capsys, "fio", "apt-get install fio", "--no-fio")
    assert not (tmp_path / "w").exists() and not (tmp_path / "io.json").exists()  # refused before any work


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
