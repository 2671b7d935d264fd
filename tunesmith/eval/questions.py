"""Question sets for `tunesmith compare`: the user's file, and the bundled general control set.

Contract:
- `load_questions(path, splits=...)` reads .jsonl, .json (a list) or .csv rows with a non-empty
  `question` and `answer` and optional `fact_id` and `split` (default split: `all`). A split is
  one of `SPLITS` (seen, doc_only, general) or `all`, or a name that `splits` (`compare.splits`)
  maps onto one. A missing file, a row without a question or answer, an unknown split, or fact
  ids that do not match (one fact id with two different answers, or in two splits — splits are by
  fact, so a fact's paraphrases must stay together) is a `UserError` naming file and line.
- `is_question_file(path)`: whether a data file is in this format (its first row has `question`
  and `answer` and no training-format key), so `data check --eval` can read it.
- `echoed(questions)`: the questions whose gold answer occurs in the question itself
  (`metrics.in_question`); `compare` flags them in one warning line and scores them with the echo
  rule of `metrics.contains`.
- `general_questions(spec)` is the forgetting control set: the bundled one for `"bundled"`, the
  user's file otherwise, none for `""`; every row gets split `general`.
- `limit_per_split(questions, n, seed)` keeps at most n questions per split (seeded, whole
  facts first so a subset still spans as many facts as possible).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tunesmith.data.formats import unicode_text
from tunesmith.errors import UserError
from tunesmith.eval.metrics import in_question

GENERAL = "general"
SPLITS = ("seen", "doc_only", GENERAL)  # facts trained on · facts only in the documents · forgetting control
NO_SPLIT = "all"
_TRAINING_KEYS = ("messages", "conversations", "instruction", "prompt", "text")


@dataclass
class Question:
    question: str
    answer: str
    split: str
    fact_id: str | None
    source: str  # file:line, for messages and the results file


def bundled(name: str) -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "quickstart" / name))


def load_questions(
    path: str | Path, key: str = "compare.questions", default_split: str = NO_SPLIT, splits: dict | None = None
) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config key {key}: {path} is not a file")
    rows = list(_rows(path))
    if not rows:
        raise UserError(f"{path}: no questions in the file")
    out, answers, fact_splits = [], {}, {}
    for loc, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{loc}: expected an object with question and answer")
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise UserError(f'{loc}: expected a non-empty "question" string')
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            raise UserError(f'{loc}: question has no answer (expected a non-empty "answer" string)')
        split = str(row.get("split") or default_split)
        split = GENERAL if default_split == GENERAL else _split(split, splits or {}, loc)  # control set: all general
        fact = row.get("fact_id")
        fact = None if fact in (None, "") else str(fact)
        if fact is not None:
            if answers.setdefault(fact, a) != a:
                raise UserError(
                    f"{loc}: fact ids do not match: fact_id {fact} has answer {answers[fact]!r} elsewhere, {a!r} here"
                )
            if fact_splits.setdefault(fact, split) != split:
                raise UserError(
                    f"{loc}: fact ids do not match: fact_id {fact} is in split {fact_splits[fact]!r} elsewhere, "
                    f"{split!r} here "
                    "(splits are by fact: all paraphrases of a fact belong to one split)"
                )
        unicode_text(q + a, loc, "question/answer")
        out.append(Question(q.strip(), a.strip(), split, fact, loc))
    return out


def _split(name: str, mapping: dict, loc: str) -> str:
    split = mapping.get(name, name)
    if name in mapping and split not in SPLITS:
        raise UserError(f"config key compare.splits.{name}: expected one of {', '.join(SPLITS)}, got {split!r}")
    if split not in SPLITS and split != NO_SPLIT:
        known = ", ".join(SPLITS)
        raise UserError(
            f"{loc}: unknown split {name!r}: expected one of {known} "
            f"(or map yours in the config: compare.splits: {{{name}: seen}})"
        )
    return split


def is_question_file(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".csv") or not path.is_file():
        return False
    try:
        first = next(iter(_rows(path)), (None, None))[1]
    except UserError:
        return False
    return isinstance(first, dict) and {"question", "answer"} <= set(first) and not set(first) & set(_TRAINING_KEYS)


def echoed(questions: list[Question]) -> list[Question]:
    return [q for q in questions if in_question(q.question, q.answer)]


def _rows(path: Path):
    from tunesmith.data.formats import loads, read_jsonl, read_text

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(str(path))
        return
    text = read_text(str(path)) if suffix in (".json", ".csv") else ""
    if suffix == ".json":
        data = loads(text, str(path))
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of question objects")
        for n, row in enumerate(data):
            yield f"{path}[{n}]", row
    elif suffix == ".csv":
        for n, row in enumerate(csv.DictReader(text.splitlines()), 2):
            yield f"{path}:{n}", row
    else:
        raise UserError(f"{path}: expected a .jsonl, .json or .csv questions file")


def general_questions(spec: str) -> list[Question]:
    if not spec:
        return []
    path = bundled("general.jsonl") if spec == "bundled" else Path(spec)
    rows = load_questions(path, key="compare.general_questions", default_split=GENERAL)
    for q in rows:
        q.split = GENERAL
    return rows


def general_text(spec: str) -> tuple[str, str] | None:
    """(name, text) of the forgetting perplexity text, or None when switched off."""
    if not spec:
        return None
    path = bundled("general_text.txt") if spec == "bundled" else Path(spec)
    if not path.is_file():
        raise UserError(f"config key compare.general_text: {path} is not a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"config key compare.general_text: {path} is empty")
    return path.name, text


def limit_per_split(questions: list[Question], limit: int, seed: int) -> list[Question]:
    if not limit:
        return questions
    rng = random.Random(seed)
    kept: list[Question] = []
    for split in dict.fromkeys(q.split for q in questions):
        pool = [q for q in questions if q.split == split]
        by_fact: dict = {}
        for i, q in enumerate(pool):
            by_fact.setdefault(q.fact_id or f"#{i}", []).append(q)
        groups = list(by_fact.values())
        rng.shuffle(groups)
        # round-robin over facts: one paraphrase of every fact before a second of any
        picked, depth = [], 0
        while len(picked) < min(limit, len(pool)):
            for g in groups:
                if depth < len(g) and len(picked) < limit:
                    picked.append(g[depth])
            depth += 1
        kept.extend(sorted(picked, key=pool.index))
    return kept
