"""Atomic writes: a file or directory is either wholly the old one or wholly the new one.

Contract:
- `fsync_file(path)`, `fsync_dir(path)`: flush a file's data, or a directory's entries, to disk.
- `write_atomic(path, text)`: write `text` (UTF-8) to a temporary sibling, fsync it, rename it
  over `path`, and fsync the directory. A kill at any moment leaves the old file or the new one.
- `replace_dir(tmp, out)`: move a finished temporary directory onto `out` (fsyncing its files
  first); an old `out` is set aside, then removed, so a crash never leaves half of either.
- `load_yaml(text, name)`: YAML safe types, a key given twice refused; failures are `UserError`s.
- `sweep_temp(directory, name=None)`: the leftovers of killed writes in `directory` (`.NAME.tmp-PID`,
  `.NAME.old-PID`; only those of `name`, one NAME or several) removed; an `.old` whose NAME is gone (a kill between
  `replace_dir`'s two renames) is renamed back, so the previous complete version is not lost.
- `write_manifest(directory)` / `manifest_problem(directory, required)`: `manifest.json` records
  every file's size and SHA-256; the check names the first file missing, of another size or hash.
- `OutputLock(target, beside=False)`: an advisory `flock` for a writer, a context manager. The
  lock file is `target/.tunesmith.lock` (a folder written in place; created, and removed again
  if it was made and stays empty) or, with `beside`, `.NAME.tunesmith.lock` next to `target` (a
  file or a folder replaced whole). It holds the writer's pid; a second writer gets a one-line
  `UserError` naming it. Re-entrant within a process; under torchrun only rank 0 locks.
- `replacing(target, key)`: what a writer of a file or folder replaced whole holds: the lock
  beside `target`, and `target`'s leftovers of killed writes swept on entry and exit.
- `check_not_input(out, inputs, key)`: an output may not be one of its inputs, nor contain one.
Every writer of run dirs, checkpoints, exports and records goes through these.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from tunesmith.errors import UserError

LOCK_NAME = ".tunesmith.lock"
MANIFEST = "manifest.json"
TEMP = re.compile(r"^\.(?P<name>.+?)[.-](?P<kind>tmp|old)-\d+$")


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


def sweep_temp(directory: str | Path, name: str | tuple[str, ...] | None = None) -> list[str]:
    """Remove (or, for an orphaned `.old`, restore) what killed writes left; returns the names.
    `name`: only the leftovers of these NAMEs (a writer sweeping a folder other writers share)."""
    directory, done = Path(directory), []
    names = (name,) if isinstance(name, str) else name
    if not directory.is_dir():
        return done
    for p in sorted(directory.iterdir()):
        m = TEMP.match(p.name)
        if not m or (names is not None and m["name"] not in names):
            continue
        original = directory / m["name"]
        if m["kind"] == "old" and not original.exists():
            os.replace(p, original)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p.name)
    return done


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST)
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (Path(directory) / MANIFEST).write_text(json.dumps({"files": entries}, indent=1), encoding="utf-8")


def manifest_problem(directory: Path, required: tuple[str, ...] = ()) -> str | None:
    """None when every file the manifest lists is there with its size and hash (without a
    manifest, from an older tunesmith: when the `required` files are there); else why not."""
    directory = Path(directory)
    try:
        listed = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        listed = None
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    if listed is None:
        missing = [f for f in required if not (directory / f).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name in required:
        if name not in listed:
            return f"{name} is not in {MANIFEST}"
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size:,} bytes, {MANIFEST} says {entry['bytes']:,}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def check_not_input(out: str | Path, inputs, key: str | None = None) -> None:
    """Refuse an output that is one of `inputs` (paths; missing ones are ignored) or contains one."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if source == target:
            raise _error(f"{out} is the input {item} itself; choose another output", key)
        if source.is_relative_to(target):
            raise _error(f"{out} holds the input {item}; writing there could destroy it; choose another", key)


def _error(message: str, key: str | None) -> UserError:
    """A config key (`train.output_dir`) is named in the message; a library argument (`out_dir`) is
    the error's key, which the CLI renames to its flag."""
    return UserError(f"config key {key}: {message}") if key and "." in key else UserError(message, key=key)


_HELD: dict[str, list] = {}  # lock file → [fd, count]


class OutputLock:
    def __init__(self, target: str | Path, beside: bool = False, key: str | None = None):
        self.target, self.key = Path(target).expanduser(), key
        if beside:
            self.file = self.target.parent / f".{self.target.name}{LOCK_NAME}"
        else:
            self.file = self.target / LOCK_NAME
        self.made: Path | None = None
        self.active = os.environ.get("RANK", "0") == "0"

    def __enter__(self) -> OutputLock:
        if not self.active:
            return self
        folder = self.file.parent
        try:
            if not folder.exists():
                folder.mkdir(parents=True)
                self.made = folder
            self.id = str(self.file.resolve())
            if self.id in _HELD:
                _HELD[self.id][1] += 1
                return self
            fd = self._acquire()
        except OSError as err:
            self._unmake()
            raise _error(f"{self.target}: cannot write there ({err.strerror or err})", self.key) from None
        _HELD[self.id] = [fd, 1]
        return self

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                self._unmake()
                raise _error(
                    f"{self.target} is being written by another tunesmith process (pid {holder}); "
                    "wait for it to finish, or choose another output",
                    self.key,
                ) from None
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder removed while we waited to open it
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if not self.active or self.id not in _HELD:
            return
        entry = _HELD[self.id]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.id]
            self.file.unlink(missing_ok=True)  # while still holding it: see `_acquire`
            os.close(entry[0])
            self._unmake()

    def _unmake(self) -> None:
        """A folder this lock created is removed again if nothing was written into it."""
        if self.made is not None:
            try:
                self.made.rmdir()
            except OSError:
                pass


@contextmanager
def replacing(target: str | Path, key: str | None = None):
    target = Path(target).expanduser()
    with OutputLock(target, beside=True, key=key):
        sweep_temp(target.parent, target.name)
        try:
            yield
        finally:
            sweep_temp(target.parent, target.name)
