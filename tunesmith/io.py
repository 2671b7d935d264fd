"""Atomic writes: a file or directory is either wholly the old one or wholly the new one.

Contract:
- `fsync_file(path)`, `fsync_dir(path)`: flush a file's data, or a directory's entries, to disk.
- `write_atomic(path, text)`: write `text` (UTF-8) to a temporary sibling, fsync it, rename it
  over `path`, and fsync the directory. A kill at any moment leaves the old file or the new one.
- `replace_dir(tmp, out)`: move a finished temporary directory onto `out` (fsyncing its files
  first); an old `out` is set aside, then removed, so a crash never leaves half of either.
- `load_yaml(text, name)`: YAML safe types, a key given twice refused; failures are `UserError`s.
Every writer of run dirs, checkpoints, exports and records goes through these.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from tunesmith.errors import UserError


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    silently keeps the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise UserError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_yaml(text: str, name: str = "<value>", or_text: bool = False):
    """`text` as YAML (safe types only); a duplicate key, bad syntax (unless `or_text`: then the
    text itself) or a value Python cannot hold (a 5,000-digit integer, nesting deeper than the
    interpreter's stack) is a one-line `UserError`."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        if or_text:
            return text
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{name}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except (ValueError, RecursionError) as err:  # int('9' * 5000), deep [[[[...]]]]
        raise UserError(f"{name}: a value cannot be read ({str(err)[:80] or type(err).__name__})") from None
    finally:
        loader.dispose()
