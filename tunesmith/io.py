"""Atomic writes: a file or directory is either wholly the old one or wholly the new one.

Contract:
- `fsync_file(path)`, `fsync_dir(path)`: flush a file's data, or a directory's entries, to disk.
- `write_atomic(path, text)`: write `text` (UTF-8) to a temporary sibling, fsync it, rename it
  over `path`, and fsync the directory. A kill at any moment leaves the old file or the new one.
- `replace_dir(tmp, out)`: move a finished temporary directory onto `out` (fsyncing its files
  first); an old `out` is set aside, then removed, so a crash never leaves half of either.
Every writer of run dirs, checkpoints, exports and records goes through these.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """The files directly in `directory`, then the directory itself."""
    for file in Path(directory).iterdir():
        if file.is_file():
            fsync_file(file)
    fsync_dir(directory)


def write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def replace_dir(tmp: Path, out: Path) -> None:
    fsync_tree(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
