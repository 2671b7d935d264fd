"""Where records come from: a data file, a dataset folder, a folder of shards, or a hub dataset.

Contract:
- `open_sources(data_cfg)` → (train sources, validation sources), see there.
- `open_source(entry, split, subset)` turns one `data.train`/`data.validation` entry into a
  `Source` with `name` (how errors name it), `fingerprint()` (changes whenever the records can)
  and `records()`, yielding `(where, record, flavor)`: `where` is `file:line`, `file:row N`,
  `folder:row N` or `name[split]:row N`; `flavor` is `json`, `csv` (list fields hold JSON text)
  or `txt` (a paragraph of a .txt file, always the `text` format).
- Kinds, tried in this order:
  * a file with a known extension (`formats.FILE_TYPES`, plus `.arrow`);
  * a folder written by `datasets.Dataset.save_to_disk` (`state.json` + Arrow shards), read
    whole; one written by `DatasetDict.save_to_disk` (`dataset_dict.json`), read at `split`;
  * any other folder: its data files (recursively, hidden ones skipped) are shards. Split names
    follow the Hugging Face convention: a file or folder name holding train/training,
    validation/valid/val/dev or test/testing/eval/evaluation as a word (`train-00000-of-00002.
    parquet`, `data/test.jsonl`, `validation/part0.arrow`) puts the file in that split; a folder
    whose names hold none is one split, read whole (a mix of both is an error, not a silent skip);
  * anything else that looks like `owner/name` or `name` is a Hugging Face Hub dataset, loaded
    with `datasets.load_dataset(name, subset, split=split)` (needs the `datasets` package and
    the network, or its local cache).
- Sources holding one split ignore `split`; a source with splits that lacks `split`, a hub name
  while offline, an unreadable folder: `UserError`, one line naming the entry.
- Fingerprints: a file's bytes; a folder's data files' relative names, sizes and mtimes; a hub
  dataset's `_fingerprint` (the `datasets` library's content hash of the loaded split).
Nothing here imports torch; `datasets` is imported only for a hub name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from tunesmith.config import HUB_NAME
from tunesmith.data import formats
from tunesmith.errors import UserError

SHARD_TYPES = formats.FILE_TYPES + (".arrow",)
# the Hugging Face split keywords (datasets.data_files), each mapped to its canonical split name
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
_SEP = r"[-._ 0-9]"


class Source:
    """One entry of data.train/data.validation, opened; `has_splits` when it holds several."""

    def __init__(self, name: str, kind: str, fingerprint, records, has_splits: bool = False):
        self.name, self.kind, self.has_splits = name, kind, has_splits
        self._fingerprint, self._records = fingerprint, records

    def fingerprint(self) -> str | None:
        return self._fingerprint()

    def records(self):
        return self._records()


def open_source(entry, split: str = "train", subset: str | None = None) -> Source:
    name = str(entry)
    p = Path(name)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            return _dataset_dict(p, split)
        if (p / "state.json").is_file():
            return _saved_dataset(p, name)
        return _shards(p, split)
    if p.suffix.lower() in SHARD_TYPES or p.exists() or not HUB_NAME.match(name):
        return Source(name, "file", lambda: _file_fingerprint(name), lambda: file_records(name))
    return _hub(name, split, subset)


def open_sources(cfg) -> tuple[list[Source], list[Source]]:
    """The train and validation sources a `DataConfig` names. Validation: the `data.validation`
    entries at `validation_split` (default `validation`); else, when `validation_split` is set,
    that split of every `data.train` source (each must have splits); else none."""
    train = [open_source(e, cfg.split, cfg.subset) for e in cfg.train]
    if cfg.validation:
        return train, [open_source(e, cfg.validation_split or "validation", cfg.subset) for e in cfg.validation]
    if not cfg.validation_split:
        return train, []
    val = [open_source(e, cfg.validation_split, cfg.subset) for e in cfg.train]
    for src in val:
        if not src.has_splits:
            raise UserError(
                f"{src.name}: holds a single split, so data.validation_split={cfg.validation_split} has nothing "
                "to read from it; give data.validation, or a source with splits (DatasetDict folder, hub dataset)"
            )
    return train, val


def file_records(path: str):
    """(where, record, flavor) of one data file; its type checks come from `formats`."""
    if Path(path).suffix.lower() == ".arrow":
        if not Path(path).is_file():
            raise UserError(f"{path}: data file not found")
        return ((loc, rec, "json") for loc, rec in _arrow_rows([Path(path)], path))
    return formats.file_records(path)


# ---------------------------------------------------------------- folders


def _dataset_dict(folder: Path, split: str) -> Source:
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}: dataset_dict.json is not a DatasetDict.save_to_disk index") from None
    if split not in splits:
        raise UserError(
            f"{folder}: no split {split!r} in this dataset folder (it has {', '.join(splits)}); {_SPLIT_HINT}"
        )
    source = _saved_dataset(folder / split, f"{folder}[{split}]")
    source.has_splits = True
    return source


def _saved_dataset(folder: Path, name: str) -> Source:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}: state.json is not a Dataset.save_to_disk index") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder}: shard {missing[0]} listed in state.json is missing")

    def records():
        return ((loc, rec, "json") for loc, rec in _arrow_rows(files, name))

    return Source(name, "dataset", lambda: _files_fingerprint(folder, [folder / "state.json", *files]), records)


def _shards(folder: Path, split: str) -> Source:
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in SHARD_TYPES
        and not any(part.startswith((".", "_")) for part in f.relative_to(folder).parts)
    )
    if not files:
        raise UserError(f"{folder}: no data files in this folder; expected {', '.join(SHARD_TYPES)} files")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f.relative_to(folder)), []).append(f)
    stray = by_split.pop(None, [])
    if by_split and stray:  # never drop a file silently
        raise UserError(
            f"{stray[0]}: its name gives no split while other files in {folder} name theirs "
            f"({', '.join(sorted(by_split))}); rename it (e.g. train-{stray[0].name}) or move it out"
        )
    if by_split:
        if split not in by_split:
            raise UserError(
                f"{folder}: no split {split!r} among these shards (file names give {', '.join(sorted(by_split))}); "
                + _SPLIT_HINT
            )
        files = by_split[split]
    name = str(folder)

    def records():
        for f in files:
            yield from file_records(str(f))

    return Source(name, "shards", lambda: _files_fingerprint(folder, files), records, has_splits=bool(by_split))


_SPLIT_HINT = "set data.split (data.validation_split for validation)"


def _split_of(rel: Path) -> str | None:
    """The canonical split a shard's relative path names, or None (first match wins, folders first)."""
    parts = [*rel.parts[:-1], rel.stem]
    for part in parts:
        for word, split in SPLIT_WORDS.items():
            if re.search(rf"(^|{_SEP}){word}($|{_SEP})", part.lower()):
                return split
    return None


def _arrow_rows(files: list[Path], name: str):
    """Rows of Arrow IPC files (stream format, as `datasets` writes them, or file format), numbered
    from 1 across all files."""
    import pyarrow as pa

    n = 0
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                try:
                    table = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    src.seek(0)
                    table = pa.ipc.open_file(src).read_all()
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{f}: not a readable Arrow file ({str(err).splitlines()[0]})") from None
        for record in table.to_pylist():
            n += 1
            yield f"{name}:row {n}", record


def _file_fingerprint(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None  # the reader then reports it properly
    return h.hexdigest()


def _files_fingerprint(folder: Path, files: list[Path]) -> str | None:
    h = hashlib.sha256()
    try:
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    except OSError:
        return None
    return h.hexdigest()


# ---------------------------------------------------------------- the hub


def _offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub(name: str, split: str, subset: str | None) -> Source:
    label = f"{name}[{split}]" if subset is None else f"{name}/{subset}[{split}]"
    loaded = []

    def dataset():
        if not loaded:
            loaded.append(_load_hub(name, split, subset))
        return loaded[0]

    def records():
        for n, record in enumerate(dataset(), start=1):
            yield f"{label}:row {n}", record, "json"

    return Source(label, "hub", lambda: f"{label}\0{dataset()._fingerprint}", records, has_splits=True)


def _load_hub(name: str, split: str, subset: str | None):
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{name}: no such data file or folder; to load it as a Hugging Face Hub dataset, pip install datasets"
        ) from None
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # the hub client raises many types (connection, not found, bad split/config)
        first = (str(err).splitlines() or [type(err).__name__])[0]
        unreachable = isinstance(err, ConnectionError) or "Connect" in type(err).__name__
        if _offline() or unreachable:
            raise UserError(
                f"{name}: no such data file or folder, and the Hugging Face Hub cannot be reached "
                f"({'HF_HUB_OFFLINE=1' if _offline() else 'no network'}) with no cached copy; "
                "download it once online, or use save_to_disk / parquet files"
            ) from None
        raise UserError(f"{name}: no such data file or folder, and not loadable as a hub dataset ({first})") from None
