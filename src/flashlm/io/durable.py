"""Durability on disk: the fsync of a directory, so that a rename into it survives a crash (a
store written by flashlm.io.writer, a model file assembled by flashlm.builtin). Imports nothing
heavy: `flashlm pull` uses it without loading torch."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
