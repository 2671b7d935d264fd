"""Raw text → a cached, memory-mapped token stream → fixed blocks with a validation split.

Contract:
- `corpus_files(paths)` expands `pretrain.corpus` (.txt/.md/.text files, .jsonl files whose
  records carry a `text` string, folders searched recursively for those) into a sorted file list.
- `corpus_key(files)` is a sha256 over the files' bytes (and kinds), so a moved or copied corpus
  keeps its cache and an edited one does not.
- `pieces(files)` streams `(text, end_of_document)`: text files in ~1 MiB pieces cut at line
  ends, jsonl one record at a time. It never holds a whole file, so corpora larger than RAM
  work. A NUL byte or invalid UTF-8 is a binary file: `UserError` naming file and byte offset.
- `token_stream(files, tokenizer, cache_dir)` tokenises once into `pretrain-<key>.bin` (raw
  uint16/uint32, the document separator `eos` after every document) plus `pretrain-<key>.json`
  (token, byte and document counts, unigram entropy), keyed by corpus and tokenizer; both are
  written under temporary names and renamed, so a killed run never leaves a half cache.
- `split_blocks(n_tokens, block_size, val_fraction)` cuts the stream into non-overlapping
  blocks and holds out every k-th block (evenly spread, at most `MAX_VAL_BLOCKS`).
- `BlockRows(memmap, block_size, indices)` is a lazy sequence of `Row`s for the training loop:
  rows are read from the memmap when a batch needs them, never all at once.
Bits per byte = loss (nats/token) × tokens / (bytes × ln 2), with the corpus's own
tokens-per-byte: validation blocks are spread evenly through it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tunesmith.data.formats import loads, unicode_text
from tunesmith.data.packing import Row
from tunesmith.errors import UserError
from tunesmith.io import write_atomic

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
PIECE = 1 << 20
MAX_VAL_BLOCKS = 512
CACHE_VERSION = 1


def corpus_files(paths: list[str]) -> list[Path]:
    if not paths:
        raise UserError(
            "config key pretrain.corpus: no corpus given; expected .txt/.md/.jsonl files or folders of them"
        )
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise UserError(f"{path}: this corpus folder holds no .txt, .md or .jsonl files")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in suffixes:
                raise UserError(f"{path}: expected a .txt, .md or .jsonl file (or a folder of them) in pretrain.corpus")
            files.append(path)
        else:
            raise UserError(f"config key pretrain.corpus: {p} not found")
    return files


def corpus_key(files: list[Path]) -> str:
    h = hashlib.sha256(f"corpus v{CACHE_VERSION}".encode())
    for f in files:
        h.update(b"\0jsonl\0" if f.suffix.lower() in JSONL_SUFFIXES else b"\0text\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(PIECE), b""):
                h.update(block)
    return h.hexdigest()[:24]


def _binary(path: Path, offset: int, why: str) -> UserError:
    return UserError(f"{path}: looks binary ({why} at byte {offset}); pre-training reads UTF-8 text")


def _text_pieces(path: Path):
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, carry = 0, ""
    with open(path, "rb") as fh:
        for raw in iter(lambda: fh.read(PIECE), b""):
            nul = raw.find(b"\0")
            if nul >= 0:
                raise _binary(path, offset + nul, "a NUL byte")
            try:
                text = carry + decoder.decode(raw)
            except UnicodeDecodeError as err:
                raise _binary(path, offset + err.start, "invalid UTF-8") from None
            offset += len(raw)
            cut = text.rfind("\n") + 1
            if cut:
                yield text[:cut]
                carry = text[cut:]
            else:
                carry = text
        try:
            carry += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _binary(path, offset, "a truncated UTF-8 character") from None
    if carry:
        yield carry


def _jsonl_pieces(path: Path):
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if b"\0" in raw:
                raise _binary(path, fh.tell(), "a NUL byte")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{line_no}: not UTF-8 text; pre-training reads UTF-8 text") from None
            if not line.strip():
                continue
            record = loads(line, str(path), line_no)
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{path}:{line_no}: expected an object with a "text" string')
            yield unicode_text(text, f"{path}:{line_no}", "text")


def pieces(files: list[Path]):
    """(text, end_of_document) in order; a text file is one document, a jsonl record is one."""
    for f in files:
        if f.suffix.lower() in JSONL_SUFFIXES:
            for text in _jsonl_pieces(f):
                yield text, True
        else:
            last = None
            for text in _text_pieces(f):
                if last is not None:
                    yield last, False
                last = text
            if last is not None:
                yield last, True


def texts(files: list[Path]):
    """Plain strings for the tokenizer trainer (lines, so its word counts see whole words)."""
    for text, _ in pieces(files):
        yield from text.splitlines(keepends=True)


def _token_dtype(vocab: int):
    return np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32


def token_stream(files: list[Path], tokenizer, cache_dir: Path, key: str | None = None) -> tuple[np.memmap, dict]:
    """(memmap of every token, meta); tokenises only when the cache lacks this corpus+tokenizer."""
    from tunesmith.data.sft import _tokenizer_fingerprint

    key = key or corpus_key(files)
    tok_hash = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode()).hexdigest()
    name = hashlib.sha256(f"{CACHE_VERSION}|{key}|{tok_hash}".encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    bin_path, meta_path = cache_dir / f"pretrain-{name}.bin", cache_dir / f"pretrain-{name}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return np.memmap(bin_path, dtype=meta["dtype"], mode="r"), {**meta, "from_cache": True}
    meta = _tokenize(files, tokenizer, cache_dir, bin_path)
    write_atomic(meta_path, json.dumps(meta, indent=1))
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r"), {**meta, "from_cache": False}


def _tokenize(files, tokenizer, cache_dir: Path, bin_path: Path) -> dict:
    vocab = len(tokenizer)
    dtype = _token_dtype(vocab)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("model tokenizer: it has no end-of-sequence token to separate documents")
    backend = tokenizer.backend_tokenizer
    counts = np.zeros(vocab, dtype=np.int64)
    n_tokens = n_bytes = n_docs = 0
    has_text = False
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_name(bin_path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        for text, end in pieces(files):
            ids = [
                i
                for enc in backend.encode_batch(text.splitlines(keepends=True), add_special_tokens=False)
                for i in enc.ids
            ]
            if end:
                ids.append(eos)
                n_docs += 1
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and arr.max() >= vocab:
                raise UserError(
                    f"model tokenizer: produced token id {int(arr.max())} outside its own vocabulary of {vocab}"
                )
            counts += np.bincount(arr, minlength=vocab)
            arr.astype(dtype).tofile(out)
            n_tokens += arr.size
            n_bytes += len(text.encode("utf-8"))
            has_text = has_text or bool(text.strip())
        out.flush()
        os.fsync(out.fileno())
    if not has_text:
        tmp.unlink(missing_ok=True)
        raise UserError(f"config key pretrain.corpus: the corpus is empty ({len(files)} file(s), no text)")
    os.replace(tmp, bin_path)
    p = counts[counts > 0] / n_tokens
    entropy = float(-(p * np.log2(p)).sum())
    return {
        "version": CACHE_VERSION,
        "n_tokens": int(n_tokens),
        "n_bytes": int(n_bytes),
        "n_docs": n_docs,
        "dtype": np.dtype(dtype).name,
        "vocab": vocab,
        "files": [str(f) for f in files],
        "unigram_bits_per_token": round(entropy, 4),
        "unigram_bits_per_byte": round(entropy * n_tokens / n_bytes, 4),
    }


def split_blocks(n_tokens: int, block_size: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_blocks = n_tokens // block_size
    if n_blocks < 2:
        raise UserError(
            f"config key pretrain.corpus: {n_tokens} tokens make fewer than 2 blocks of "
            f"pretrain.block_size={block_size}; "
            "add text or lower pretrain.block_size"
        )
    k = max(2, round(1 / val_fraction))
    val = np.arange(k - 1, n_blocks, k)
    if val.size == 0:
        val = np.array([n_blocks - 1])
    if val.size > MAX_VAL_BLOCKS:
        val = val[:: math.ceil(val.size / MAX_VAL_BLOCKS)]
    train = np.setdiff1d(np.arange(n_blocks), val)
    return train, val


def bits_per_byte(loss_nats: float, meta: dict) -> float:
    return loss_nats * meta["n_tokens"] / (meta["n_bytes"] * math.log(2))


class BlockRows(Sequence):
    """Rows of `block_size` consecutive tokens; labels are the tokens themselves (the loss
    shifts them), positions 0…T-1. Indexing reads the memmap, so RAM holds only a batch."""

    def __init__(self, tokens: np.ndarray, block_size: int, indices: np.ndarray):
        self.tokens, self.block_size, self.indices = tokens, block_size, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        start = int(self.indices[i]) * self.block_size
        ids = self.tokens[start : start + self.block_size].astype(np.int64).tolist()
        return Row(ids, list(ids), list(range(self.block_size)))
