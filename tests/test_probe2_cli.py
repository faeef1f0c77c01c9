"""Issue 30 (a second hostile probe) through the real `flashlm` entry point in a subprocess:
each bad input is one line on stderr naming the problem, exit 1, no traceback, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flashlm
from conftest import random_llama, save_checkpoint
from flashlm.convert import convert
from flashlm.io.format import Manifest

SRC = Path(flashlm.__file__).resolve().parents[1]
FLASHLM = str(Path(sys.executable).parent / "flashlm")


def flashlm_cli(*argv: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
         **(env or {})}
    return subprocess.run([FLASHLM, *argv], input=stdin, capture_output=True, env=e, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    return save_checkpoint(random_llama(), tmp_path_factory.mktemp("p2") / "ckpt", tokenizer)


@pytest.fixture(scope="module")
def store(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p2store") / "store"
    convert(ckpt, out, dtype="float32", progress=False)
    return out


# -- item 1: --force deletes only what flashlm wrote ------------------------------------------------

FOREIGN = {
    "web app": {"name": "app", "start_url": "/"},
    "a list": [1, 2, 3],
    "not JSON": "{{{",
    "another format": {"format": "someone-else", "format_version": 2},
    "our format name, no version": {"format": "flashlm-store"},
}


@pytest.mark.parametrize("shape", list(FOREIGN))
def test_force_refuses_a_directory_with_someone_elses_manifest(tmp_path, ckpt, shape):
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    body = FOREIGN[shape]
    (webapp / "manifest.json").write_text(body if isinstance(body, str) else json.dumps(body))
    (webapp / "index.html").write_text("precious")
    r = flashlm_cli("convert", str(ckpt), str(webapp), "--dtype", "int8", "--force", "--quiet")
    one_line_error(r, "not a flashlm store", "nothing was changed")
    assert (webapp / "index.html").read_text() == "precious"
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # refused before anything was written


def test_force_refuses_a_store_with_foreign_files_beside_it_and_replaces_a_clean_one(tmp_path, ckpt, store):
    """A real store's manifest copied into someone's directory is still not ours to delete."""
    mine = tmp_path / "mine"
    shutil.copytree(store, mine)
    (mine / "notes.txt").write_text("keep")
    one_line_error(flashlm_cli("convert", str(ckpt), str(mine), "--force", "--quiet"), "notes.txt")
    assert (mine / "notes.txt").read_text() == "keep"
    (mine / "notes.txt").unlink()
    # a store whose ffn.bin is not flashlm's (its manifest copied beside someone's file)
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(store / "manifest.json", fake / "manifest.json")
    (fake / "ffn.bin").write_bytes(b"my own data")
    one_line_error(flashlm_cli("convert", str(ckpt), str(fake), "--force", "--quiet"), "ffn.bin")
    assert (fake / "ffn.bin").read_bytes() == b"my own data"
    r = flashlm_cli("convert", str(ckpt), str(mine), "--dtype", "int8", "--force", "--quiet")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((mine / "manifest.json").read_text())["dtype"] == "int8"


def test_a_later_convert_sweeps_stale_partials_of_dead_writers(tmp_path, ckpt):
    out = tmp_path / "s"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.partial-{int(dead.stdout)}-abc123"  # a SIGKILLed convert's leftovers
    stale.mkdir()
    (stale / "ffn.bin").write_bytes(b"x" * 100)
    live = tmp_path / f".s.partial-{os.getpid()}-xyz"  # a write still running (this process): kept
    live.mkdir()
    other = tmp_path / ".t.partial-1-zzz"  # another OUT's: not this convert's to judge
    other.mkdir()
    r = flashlm_cli("convert", str(ckpt), str(out), "--quiet")
    assert r.returncode == 0, r.stderr.decode()
    assert not stale.exists() and live.exists() and other.exists()


# -- item 3: bad text and sampling input ------------------------------------------------------------

def test_invalid_utf8_on_stdin_is_a_named_error(store):
    r = flashlm_cli("run", "--model", str(store), "--raw", "-", stdin=b"\xff\xfe\xc3\x28 x")
    one_line_error(r, "not valid UTF-8", "byte 0")


def test_a_lone_surrogate_is_a_named_error(store):
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    r = subprocess.run([FLASHLM.encode(), b"run", b"--model", str(store).encode(), b"--raw", b"ab\xed\xa0\x80cd"],
                       capture_output=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(SRC)})
    one_line_error(r, "not valid UTF-8", "character 2")


def test_a_tiny_top_p_keeps_one_token(store):
    r = flashlm_cli("run", "--model", str(store), "--raw", "--temperature", "1", "--top-p", "1e-300", "-n", "4",
                    "--json", "hello", "--quiet")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout.decode().strip().splitlines()[-1])["tokens"] == 4


# -- item 6 and 8: serve's start-up checks, the trace directory -------------------------------------

@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_an_empty_api_key(store, how):
    argv = ["serve", str(store), "--port", "0"] + (["--api-key", ""] if how == "flag" else [])
    r = flashlm_cli(*argv, env={"FLASHLM_API_KEY": ""} if how == "env" else None, timeout=60)
    one_line_error(r, "--api-key must not be empty")


def test_serve_refuses_a_negative_shutdown_timeout(store):
    one_line_error(flashlm_cli("serve", str(store), "--port", "0", "--shutdown-timeout", "-5", timeout=60),
                   "--shutdown-timeout", "-5")


def test_trace_into_a_missing_directory_is_a_named_error(store, tmp_path):
    where = tmp_path / "nonexistent" / "dir" / "t.jsonl"
    one_line_error(flashlm_cli("run", "--model", str(store), "--trace", str(where), "-n", "2", "hi"),
                   "does not exist", "--trace")
    assert not (tmp_path / "nonexistent").exists()


# -- item 8: damage named by its file; manifests that lie about the vocabulary ----------------------

def test_damaged_crc_table_is_named_as_ffn_crc32(store, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(store, s)
    data = bytearray((s / "ffn.crc32").read_bytes())
    data[10] ^= 0xFF
    (s / "ffn.crc32").write_bytes(bytes(data))
    err = one_line_error(flashlm_cli("run", "--model", str(s), "-n", "2", "hi"), "ffn.crc32")
    assert "ffn.bin" not in err


def _rewrite_manifest(src: Path, dst: Path, **config: object) -> None:
    shutil.copytree(src, dst)
    m = Manifest.from_json((dst / "manifest.json").read_text(), str(dst))
    body = json.loads(m.to_json())
    body.pop("manifest_sha256")
    body["config"].update(config)
    fixed = Manifest.from_json(json.dumps({**body, "manifest_sha256": _sum(body)}), str(dst))
    (dst / "manifest.json").write_text(fixed.to_json())


def _sum(body: dict) -> str:
    from flashlm.io.format import _body_checksum

    return _body_checksum(body)


@pytest.mark.parametrize("config,needle", [({"vocab_size": 100}, "vocab_size 100"),
                                           ({"eos_token_id": 10**9}, "eos_token_id 1000000000")])
def test_manifest_whose_vocabulary_disagrees_is_refused_at_open(store, tmp_path, config, needle):
    s = tmp_path / "s"
    _rewrite_manifest(store, s, **config)
    one_line_error(flashlm_cli("run", "--model", str(s), "-n", "2", "hi"), needle)
