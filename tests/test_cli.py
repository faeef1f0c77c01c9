"""The `flashlm` console script, run for real in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_llama, save_checkpoint, tiny_tokenizer

FLASHLM = shutil.which("flashlm", path=str(Path(sys.executable).parent)) or shutil.which("flashlm")


def flashlm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert FLASHLM, "the flashlm console script is not installed (pip install -e .)"
    return subprocess.run([FLASHLM, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_checkpoint(random_llama(3), root / "ckpt", tiny_tokenizer())


def test_convert_run_verify(ckpt, tmp_path):
    out = tmp_path / "store"
    r = flashlm("convert", str(ckpt), str(out), "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["model_type"] == "llama" and summary["dtype"] == "float32" and summary["layers"] == 2

    r = flashlm("run", "--model", str(out), "--raw", "--max-tokens", "12", "--json", "The quick brown")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens"] == len(res["token_ids"]) <= 12 and res["finish_reason"] in ("stop", "length")
    # the paper's eviction computes the same neurons (the window's): the same answer
    r = flashlm("run", "--model", str(out), "--raw", "--max-tokens", "12", "--json", "--eviction", "window",
                "The quick brown")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == res["token_ids"]

    r = flashlm("run", "--model", str(out), "--max-tokens", "5", "--quiet", "hello fox")
    assert r.returncode == 0 and r.stderr == ""

    assert flashlm("verify", str(out)).returncode == 0
    with open(out / "ffn.bin", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xfe")
    r = flashlm("verify", str(out))
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "/no/such/ckpt", "OUT"], "nothing exists"),
        (["run", "--model", "/no/such/store", "hi"], "neither a store directory"),
        (["run", "--model", "not-a-model", "hi"], "built-ins: smollm2-135m"),
        (["verify", "/no/such/store"], "no such store directory"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path):
    r = flashlm(*[a.replace("OUT", str(tmp_path / "o")) for a in args])
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_request_and_usage(ckpt, tmp_path):
    out = tmp_path / "store"
    assert flashlm("convert", str(ckpt), str(out), "--quiet").returncode == 0
    r = flashlm("convert", str(ckpt), str(out), "--quiet")
    assert r.returncode == 1 and "--force" in r.stderr
    r = flashlm("run", "--model", str(out), "--max-tokens", "0", "hi")
    assert r.returncode == 1 and "max_tokens must be a positive int" in r.stderr
    assert flashlm("run").returncode == 2  # argparse usage error
    assert "PROMPT" in flashlm("run", "--help").stdout


def commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and sub-command of the real parser: (path, parser), the top level first."""
    from flashlm.cli import build_parser

    out = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        out.append((path, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, (*path, name))

    walk(build_parser(), ())
    return out


def options(p: argparse.ArgumentParser) -> list[str]:
    """The long form of every option a command takes (but --help)."""
    return [max(a.option_strings, key=len) for a in p._actions
            if a.option_strings and a.help != argparse.SUPPRESS and "--help" not in a.option_strings]


def test_help_explains_every_command(capsys):
    """Each command's --help (as the console script prints it) names every option it takes and
    has an example running that very command."""
    from flashlm.cli import main

    top = flashlm("--help")
    assert top.returncode == 0 and "exit codes" in top.stdout
    found = commands()
    assert {" ".join(path) for path, _ in found} >= {"convert", "run", "chat", "serve", "verify", "calibrate", "eval",
                                                     "bench", "bench io", "bench engine", "bench scale", "trace report"}
    for path, parser in found:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        missing = [o for o in options(parser) if o not in text]
        assert not missing, (path, missing)
        examples = text[text.find("example"):] if "example" in text else ""
        assert re.search(rf"^  flashlm {re.escape(' '.join(path))}\b", examples, re.M), (path, "no example")
    assert "Esc" in flashlm("chat", "--help").stdout


def test_readme_cli_summary_lists_every_option():
    """README's CLI block names every option of every command (a line saying "as for run"
    takes run's). The block must not drift from the parser again."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## CLI\n\n```\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}  # "bench io" -> its lines
    for line in block.splitlines():
        if line.startswith("flashlm "):
            words = [w for w in line.split()[1:4] if re.fullmatch(r"[a-z]+", w)]
            key = " ".join(w for w in words if w not in ("paper",))
            entries[key] = line
        elif entries:
            entries[key] += "\n" + line
    run = dict(commands())[("run",)]
    for path, parser in commands():
        key = " ".join(path)
        if key in ("trace", "bench paper"):  # a group; the default WHAT (its line is "bench [paper]")
            continue
        text = entries.get(key)
        assert text is not None, f"README's CLI block has no line for `flashlm {key}`"
        if "as for run" in text:
            text += " ".join(options(run))
        missing = [o for o in options(parser) if o not in text]
        assert not missing, (key, missing)


def test_chat_with_a_bad_store_is_one_line_before_the_screen(tmp_path):
    r = flashlm("chat", str(tmp_path / "nope"))
    assert r.returncode == 1 and "neither a store directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert flashlm("chat", "--temperature", "warm").returncode == 2


def test_verify_json_and_prompt_from_stdin(ckpt, tmp_path):
    out = tmp_path / "store"
    assert flashlm("convert", str(ckpt), str(out), "--dtype", "float32", "--quiet").returncode == 0
    r = flashlm("verify", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"store": str(out), "sound": True, "layers": 2, "problems": []}

    r = subprocess.run([FLASHLM, "run", "--model", str(out), "--raw", "-n", "4", "--json", "-"], input="The quick",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 1 <= json.loads(r.stdout)["tokens"] <= 4
