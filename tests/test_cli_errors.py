"""Bad input through the `flashlm` command: each is one line on stderr naming the problem and
the fix, exit 1, no traceback; and nothing is installed or downloaded behind the user's back."""

from __future__ import annotations

import shutil
import subprocess

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
