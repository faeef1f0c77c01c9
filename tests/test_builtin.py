"""Built-in models: the records, and assembling a multi-part model from its installed packages
(checked sizes, sha256 while streaming, atomic rename, a named error for a damaged part)."""

from __future__ import annotations

import base64
import hashlib
import os
import random
from pathlib import Path

import pytest

from flashlm import builtin
from flashlm.builtin import BUILTINS, BuiltinModel, Package, Part, assembled_path, model_file, part_problem
from flashlm.convert import resolve_store
from flashlm.errors import ModelPartError, UnknownModelError
from flashlm.io.store import FlashStore


def test_records_add_up():
    for m in BUILTINS.values():
        assert sum(p.size for p in m.parts) == m.size and len(m.sha256) == 64, m.name
        assert len({p.package.name for p in m.parts}) == len(m.parts)
        assert all(p.module == p.name.replace("-", "_") for p in m.packages), m.name
    assert [m.name for m in BUILTINS.values()] == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
                                                     "gemma3-270m"]
    assert not BUILTINS["smollm2-135m"].assembled and BUILTINS["qwen2.5-coder-1.5b"].assembled


def test_installed_parts_are_the_recorded_files():
    """Every part installed here has the recorded size (all of them are in the dev environment)."""
    installed = [p for m in BUILTINS.values() for p in m.parts if builtin.installed_version(p.package)]
    assert installed, "no built-in model's packages are installed"
    assert [(p.package.name, part_problem(p)) for p in installed] == [(p.package.name, None) for p in installed]


def fake_site(root: Path, name: str, datas: list[bytes], version: str = "1.0") -> BuiltinModel:
    """A model in len(datas) part packages `{name}-part{i}`, laid out as pip installs them (the
    package directory with data/partNN.bin, a dist-info with METADATA and RECORD) under `root`."""
    parts = []
    for i, data in enumerate(datas, start=1):
        pkg = Package(f"{name}-part{i}", version, f"{name.replace('-', '_')}_part{i}")
        d = root / pkg.module / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise ImportError('never imported')\n")
        (d / f"part{i:02d}.bin").write_bytes(data)
        info = root / f"{pkg.module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg.name}\nVersion: {version}\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"{pkg.module}/data/part{i:02d}.bin,sha256={digest},{len(data)}\n"
                                     f"{pkg.module}/__init__.py,,\n")
        parts.append(Part(pkg, f"data/part{i:02d}.bin", len(data)))
    whole = b"".join(datas)
    return BuiltinModel(name, "Fake", "CC0", "gguf", "F32", tuple(parts), len(whole), hashlib.sha256(whole).hexdigest())


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    rng = random.Random(0)
    datas = [rng.randbytes(n) for n in (3000, 5000, 1234)]
    model = fake_site(tmp_path / "site", "fakelm", datas)
    monkeypatch.setitem(BUILTINS, model.name, model)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return model, b"".join(datas), tmp_path / "site"


def test_assembly_streams_checks_and_renames(fake, monkeypatch):
    model, whole, _site = fake
    monkeypatch.setattr(builtin, "_BUFFER", 1024)  # several reads per part
    path = model_file(model.name, progress=False)
    assert path == assembled_path(model.name) and path.read_bytes() == whole
    assert sorted(os.listdir(path.parent)) == [path.name, path.name + ".lock"]  # no .partial left
    before = path.stat().st_mtime_ns
    assert model_file(model.name, progress=False) == path and path.stat().st_mtime_ns == before  # not redone


def test_damaged_part_is_named_and_nothing_is_left(fake):
    model, _whole, site = fake
    part2 = site / model.parts[1].package.module / model.parts[1].file
    data = bytearray(part2.read_bytes())
    data[100] ^= 0xFF  # same size: only the sha256 can tell
    part2.write_bytes(bytes(data))
    with pytest.raises(ModelPartError, match=r"part 2 \(fakelm-part2==1.0\).*damaged.*pip install --force-reinstall"):
        model_file(model.name, progress=False)
    assert not assembled_path(model.name).exists()
    assert not assembled_path(model.name).with_name("fakelm.gguf.partial").exists()

    part2.write_bytes(bytes(data[:-1]))  # the wrong size is caught before anything is streamed
    with pytest.raises(ModelPartError, match=r"part 2 of 3 \(fakelm-part2==1.0\).*4,999 bytes.*expected 5,000"):
        model_file(model.name, progress=False)


def test_missing_parts_say_which_command_gets_them(fake, tmp_path):
    model, _whole, site = fake
    for part in model.parts:
        os.rename(site / f"{part.package.module}-1.0.dist-info", tmp_path / f"{part.package.module}.gone")
    with pytest.raises(UnknownModelError, match=r"'fakelm' is not installed.*run `flashlm pull fakelm`"):
        model_file(model.name, progress=False)
    with pytest.raises(UnknownModelError, match="flashlm pull fakelm"):
        resolve_store(model.name)  # what Engine.open and `flashlm run --model fakelm` do
    os.rename(tmp_path / f"{model.parts[0].package.module}.gone", site / f"{model.parts[0].package.module}-1.0.dist-info")
    with pytest.raises(UnknownModelError, match="2 of 3 part package"):  # a partial install says so too
        model_file(model.name, progress=False)


def test_run_model_name_assembles_then_converts_on_first_use(tmp_path, monkeypatch, smollm2_store):
    """A model in parts, installed but not assembled: the first `Engine.open(NAME)` (resolve_store)
    assembles it, then converts it; the store is the one SmolLM2's own file gives."""
    from conftest import smollm2_gguf

    data = smollm2_gguf().read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3 + 7, len(data)]
    model = fake_site(tmp_path / "site", "smolparts", [data[a:b] for a, b in zip(cut, cut[1:])])
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(BUILTINS, model.name, model)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    store = resolve_store(model.name, "float32", progress=False)
    assert assembled_path(model.name).read_bytes() == data
    assert store == builtin.cached_store_path(model.name, "float32")
    ours, ref = FlashStore.open(store), FlashStore.open(smollm2_store)
    assert ours.manifest.source["name"] == model.name
    assert ours.manifest.ffn.layers == ref.manifest.ffn.layers and ours.manifest.resident == ref.manifest.resident
    assert resolve_store(model.name, "float32", progress=False) == store  # cached from now on
