"""What a store write may replace, and the partial directories killed writes left behind.

`check_replaceable(out, force)`: `--force` replaces only what this project wrote - a directory
whose manifest.json is a flashlm store manifest (format name, a format version), whose ffn.bin
starts with the store's magic, and which holds nothing but a store's own files - or an empty
directory. A directory that merely has a file called manifest.json (a web app's, a browser
extension's) is someone else's and is refused by name, before any source is read (issue 30).
The manifest's checksum is not asked for: a damaged store is what `--force` is for.

`partial_prefix(out)` / `sweep_stale_partials(out)`: a write goes to `.OUT.partial-PID-XXXX`
beside OUT and is renamed into place when complete; a SIGKILLed convert leaves its directory.
A later write of the same OUT removes those whose process is gone (PID no longer running);
a write still in progress elsewhere keeps its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from flashlm.errors import StoreExistsError
from flashlm.io.format import CRC_NAME, FFN_MAGIC, FFN_NAME, FORMAT_NAME, MANIFEST_NAME, RESIDENT_NAME, TOKENIZER_DIR

_ONLY = "--force replaces only a flashlm store or an empty directory"


def check_replaceable(out: Path, force: bool) -> None:
    """A store may be written at `out` if nothing is there, or with `force` if what is there is a
    flashlm store or an empty directory. Anything else (a home directory, a checkpoint, a web
    app with a manifest.json, a file) is refused, force or not: replacing it would delete it."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise StoreExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    if out.is_symlink() or not out.is_dir():
        raise StoreExistsError(f"{out} exists and is not a directory; {_ONLY}: remove it yourself or choose "
                               f"another OUT")
    if not any(out.iterdir()):
        return
    why = _not_a_store(out)
    if why is not None:
        raise StoreExistsError(f"{out} is not a flashlm store ({why}) and not empty; {_ONLY}: nothing was "
                               f"changed; remove it yourself or choose another OUT")


def _not_a_store(root: Path) -> str | None:
    """Why `root` is not a directory this project wrote, or None if it is one."""
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        with open(mpath, "rb") as f:
            body = json.loads(f.read(1 << 24))  # a store's manifest is well under 16 MiB
    except (OSError, ValueError):
        return f"its {MANIFEST_NAME} is not JSON"
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        return f"its {MANIFEST_NAME} is not a flashlm store manifest (no \"format\": \"{FORMAT_NAME}\")"
    if isinstance(body.get("format_version"), bool) or not isinstance(body.get("format_version"), int):
        return f"its {MANIFEST_NAME} has no format version"
    try:
        with open(root / FFN_NAME, "rb") as f:
            magic = f.read(len(FFN_MAGIC))
    except OSError:
        return f"no {FFN_NAME}"
    if magic != FFN_MAGIC:
        return f"{FFN_NAME} has no flashlm header"
    own = {MANIFEST_NAME, FFN_NAME, CRC_NAME, RESIDENT_NAME, TOKENIZER_DIR, *_named_files(body)}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in own)
    if foreign:
        return f"it also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
    return None


def _named_files(body: object) -> set[str]:
    """Top-level names of every `path` the manifest lists (its files; calibrate's predictors)."""
    names: set[str] = set()
    stack = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            p = v.get("path")
            if isinstance(p, str) and p:
                names.add(p.split("/", 1)[0])
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return names


def partial_prefix(out: Path) -> str:
    """The name prefix of this process's partial directory for `out`."""
    return f".{Path(out).name}.partial-{os.getpid()}-"


def sweep_stale_partials(out: Path) -> list[Path]:
    """Remove the `.OUT.partial-PID-*` directories beside `out` whose writer PID is gone;
    returns what was removed."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.partial-(\d+)-")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None or not p.is_dir() or p.is_symlink() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # (another user's process: alive) / (no such pid can exist: still not ours to judge)
    return True
