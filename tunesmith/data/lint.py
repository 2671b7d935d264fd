"""Data quality checks for `tunesmith data check` and the warnings `train` prints.

Contract:
- `check(train, eval_paths, fmt, system_prompt, tokenizer, max_length, train_on_prompt, split,
  eval_split, subset, columns)` reads the entries (files, dataset folders, hub names) with
  `load_examples` and returns a JSON-ready report: `tool_use` (records with tools, tool calls,
  tool results), `counts` per check, `issues` (each
  with `where` = file:line and a `detail`), and length statistics with a histogram. Checks:
  `exact_duplicate` and `near_duplicate` (word 3-gram Jaccard >= NEAR, found by MinHash + LSH and
  then verified exactly) within the training data; `leakage_exact` / `leakage_near`: a training
  prompt equal or near to an evaluation prompt; `empty_answer`: an assistant message (or a text
  record) that is empty or whitespace; `over_max_length`: longer than `max_length` tokens after
  the chat template (needs a tokenizer; lengths are then tokens, else characters);
  `encoding`: U+FFFD replacement characters, mojibake ("Ã©", "â€™"), control characters.
- Bytes that are not UTF-8 are a bad file: one `UserError` naming every bad file:line (first few).
  So is anything `load_examples` refuses. Everything else is a warning; nothing is written.
- `summary(report)` is the terminal table; `train_warnings(data_cfg)` the few lines `train`
  prints (no tokenizer: `train` reports truncation itself).

Near-duplicates are judged on normalised text (NFKC, case-folded, punctuation dropped) so that
trailing spaces or a changed comma do not hide a copy; short records compare whole word sets.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import unicodedata
from collections import defaultdict
from pathlib import Path

import numpy as np

from tunesmith.data.formats import Example, load_examples
from tunesmith.data.tools import uses_tools
from tunesmith.errors import UserError

NEAR = 0.8  # Jaccard similarity of word 3-grams at which two records count as near-duplicates
PERMS, BANDS = 64, 16  # MinHash size and LSH bands (4 rows each: pairs above ~0.5 become candidates)
SHOWN = 5  # issues shown per check in the terminal
MOJIBAKE = re.compile("Ã[\u0080-\u00bf]|Â[\u0080-\u00bf]|â€[\u0080-\u00bf\u0152-\u0178\u2018-\u201e\u2020-\u2122]")
CHECKS = (
    "exact_duplicate",
    "near_duplicate",
    "leakage_exact",
    "leakage_near",
    "empty_answer",
    "over_max_length",
    "encoding",
)
TEXT_FILES = (".jsonl", ".json", ".csv", ".txt")


# ---------------------------------------------------------------- text views of an example


def full_text(ex: Example) -> str:
    if ex.text is not None:
        return ex.text
    return "\n".join(f"{m['role']}: {m['content']}{_calls_text(m)}" for m in ex.messages)


def _calls_text(message: dict) -> str:
    calls = message.get("tool_calls") or ()
    return "".join(f" [call {c['function']['name']} {json.dumps(c['function']['arguments'])}]" for c in calls)


def prompt_text(ex: Example) -> str:
    """What the model is asked: every non-assistant message (the whole text for text records)."""
    if ex.text is not None:
        return ex.text
    return "\n".join(m["content"] for m in ex.messages if m["role"] != "assistant")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def shingles(norm: str, n: int = 3) -> frozenset:
    words = norm.split()
    if len(words) <= n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


# ---------------------------------------------------------------- MinHash + LSH


_RNG = np.random.default_rng(20240611)
_A = _RNG.integers(1, 2**32, PERMS, dtype=np.uint64) | np.uint64(1)
_B = _RNG.integers(0, 2**32, PERMS, dtype=np.uint64)


def _hash32(s: str) -> int:
    # not hash(): Python salts it per process, and reports should not change between runs
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")


def signature(sh: frozenset) -> np.ndarray:
    if not sh:
        return np.full(PERMS, 2**32, dtype=np.uint64)
    h = np.fromiter((_hash32(s) for s in sh), dtype=np.uint64, count=len(sh))
    return ((np.outer(_A, h) + _B[:, None]) & np.uint64(0xFFFFFFFF)).min(axis=1)


def _buckets(sig: np.ndarray):
    rows = PERMS // BANDS
    for band in range(BANDS):
        yield band, sig[band * rows : (band + 1) * rows].tobytes()


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------- checks


def scan_utf8(paths) -> None:
    """Every line of every text data file that is not UTF-8, in one line."""
    bad = []
    for path in paths:
        p = Path(path)
        if p.suffix.lower() not in TEXT_FILES or not p.is_file():
            continue  # parquet is binary; missing files are load_examples' to report
        for number, line in enumerate(p.read_bytes().split(b"\n"), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append(f"{path}:{number} (byte 0x{line[err.start]:02x})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"{', '.join(bad[:3])}{more}: not UTF-8 text; save the file as UTF-8")


def _issue(report, kind, where, detail):
    report["issues"][kind].append({"where": where, "detail": detail})


def _encoding(report, ex: Example):
    texts = [ex.text] if ex.text is not None else [m["content"] for m in ex.messages]
    for text in texts:
        if "\ufffd" in text:
            _issue(
                report, "encoding", ex.where, "U+FFFD replacement character (text was decoded with the wrong encoding)"
            )
            return
        found = MOJIBAKE.search(text)
        if found:
            _issue(report, "encoding", ex.where, f"mojibake {found.group()!r} (UTF-8 read as Latin-1/cp1252)")
            return
        ctrl = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t\r"), None)
        if ctrl is not None:
            _issue(report, "encoding", ex.where, f"control character U+{ord(ctrl):04X}")
            return


def _empty(report, ex: Example):
    if ex.text is not None:
        if not ex.text.strip():
            _issue(report, "empty_answer", ex.where, "empty or whitespace-only text")
        return
    for i, m in enumerate(ex.messages, 1):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            _issue(report, "empty_answer", ex.where, f"assistant message {i} is empty or whitespace")


def _duplicates(report, train: list[Example]):
    norms = [normalize(full_text(ex)) for ex in train]
    first: dict[str, int] = {}
    exact = set()
    for i, norm in enumerate(norms):
        if norm in first:
            exact.add(i)
            _issue(report, "exact_duplicate", train[i].where, f"same as {train[first[norm]].where}")
        else:
            first[norm] = i
    sets = [shingles(n) for n in norms]
    buckets: dict = defaultdict(list)
    pairs = set()
    for i, sh in enumerate(sets):
        if i in exact or not sh:
            continue
        for key in _buckets(signature(sh)):
            for j in buckets[key]:
                pairs.add((j, i))
            buckets[key].append(i)
    flagged = set()
    for j, i in sorted(pairs):
        if i in flagged:
            continue
        sim = jaccard(sets[i], sets[j])
        if sim >= NEAR:
            flagged.add(i)
            _issue(report, "near_duplicate", train[i].where, f"{sim:.0%} similar to {train[j].where}")


def _leakage(report, train: list[Example], evals: list[Example]):
    exact = {}
    buckets: dict = defaultdict(list)
    eval_sets = []
    for k, ex in enumerate(evals):
        norm = normalize(prompt_text(ex))
        exact.setdefault(norm, ex.where)
        sh = shingles(norm)
        eval_sets.append(sh)
        if sh:
            for key in _buckets(signature(sh)):
                buckets[key].append(k)
    for ex in train:
        norm = normalize(prompt_text(ex))
        if norm in exact:
            _issue(report, "leakage_exact", ex.where, f"prompt equals evaluation record {exact[norm]}")
            continue
        sh = shingles(norm)
        if not sh:
            continue
        candidates = {k for key in _buckets(signature(sh)) for k in buckets.get(key, ())}
        best = max(((jaccard(sh, eval_sets[k]), k) for k in candidates), default=(0.0, -1))
        if best[0] >= NEAR:
            _issue(
                report,
                "leakage_near",
                ex.where,
                f"prompt {best[0]:.0%} similar to evaluation record {evals[best[1]].where}",
            )


def _lengths(report, train: list[Example], tokenizer, max_length, train_on_prompt):
    if tokenizer is not None:
        from tunesmith.data.sft import _tokenize  # the exact ids training uses, before truncation

        lengths = [len(_tokenize(tokenizer, ex, train_on_prompt)[0]) for ex in train]
        unit = "tokens"
    else:
        lengths = [len(full_text(ex)) for ex in train]
        unit = "characters"
    if tokenizer is not None and max_length:
        for ex, n in zip(train, lengths):
            if n > max_length:
                _issue(report, "over_max_length", ex.where, f"{n} tokens > max_length {max_length}")
    top = max(max(lengths), max_length or 0)
    edges = (
        [round(top * k / 10) for k in range(11)]
        if max_length is None
        else ([round(max_length * k / 8) for k in range(9)] + ([max(lengths)] if max(lengths) > max_length else []))
    )
    edges = sorted(set(edges))
    counts, _ = np.histogram(lengths, bins=edges)
    ordered = sorted(lengths)
    report["lengths"] = {
        "unit": unit,
        "n": len(lengths),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "mean": round(sum(lengths) / len(lengths), 1),
        "max_length": max_length,
        "histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def check(
    train_paths,
    eval_paths=(),
    fmt: str = "auto",
    system_prompt: str | None = None,
    tokenizer=None,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    split: str = "train",
    eval_split: str | None = None,
    subset: str | None = None,
    columns: dict[str, str] | None = None,
    eval_examples: tuple = (),
) -> dict:
    """`eval_examples`: evaluation records already read by the caller (compare's question files)."""
    scan_utf8(list(train_paths) + list(eval_paths))
    train = load_examples(list(train_paths), fmt, system_prompt, split, subset, columns)
    eval_split = eval_split or "validation"
    evals = load_examples(list(eval_paths), fmt, system_prompt, eval_split, subset, columns) if eval_paths else []
    evals += list(eval_examples)
    calls = [m for ex in train if ex.messages for m in ex.messages if m.get("tool_calls")]
    report = {
        "train_files": [str(p) for p in train_paths],
        "eval_files": [str(p) for p in eval_paths] + sorted({e.where.rsplit(":", 1)[0] for e in eval_examples}),
        "n_train": len(train),
        "n_eval": len(evals),
        "tool_use": {
            "records": sum(uses_tools(ex) for ex in train),
            "calls": sum(len(m["tool_calls"]) for m in calls),
            "results": sum(m["role"] == "tool" for ex in train if ex.messages for m in ex.messages),
        },
        "near_threshold": NEAR,
        "issues": {kind: [] for kind in CHECKS},
    }
    for ex in train + evals:
        _encoding(report, ex)
        _empty(report, ex)
    _duplicates(report, train)
    if evals:
        _leakage(report, train, evals)
    _lengths(report, train, tokenizer, max_length, train_on_prompt)
    report["counts"] = {kind: len(items) for kind, items in report["issues"].items()}
    return report


# ---------------------------------------------------------------- presentation

LABELS = {
    "exact_duplicate": "exact duplicates",
    "near_duplicate": f"near-duplicates (>= {NEAR:.0%})",
    "leakage_exact": "train/eval leakage (same prompt)",
    "leakage_near": "train/eval leakage (near prompt)",
    "empty_answer": "empty/whitespace answers",
    "over_max_length": "over max_length (tokens)",
    "encoding": "encoding problems",
}


def summary(report: dict) -> str:
    lines = [
        f"{report['n_train']} training records"
        + (f", {report['n_eval']} evaluation records" if report["n_eval"] else "")
    ]
    tool_use = report.get("tool_use") or {}
    if tool_use.get("records"):
        lines[0] += (
            f"; {tool_use['records']} with tools ({tool_use['calls']} tool calls, {tool_use['results']} tool results)"
        )
    width = max(len(v) for v in LABELS.values())
    lines.append(f"{'check':<{width}}  count  examples")
    lines.append("-" * (width + 40))
    for kind in CHECKS:
        if kind.startswith("leakage") and not report["n_eval"]:
            continue
        if kind == "over_max_length" and report["lengths"]["unit"] != "tokens":
            continue
        items = report["issues"][kind]
        shown = "; ".join(f"{i['where']} ({i['detail']})" for i in items[:2]) + (" …" if len(items) > 2 else "")
        lines.append(f"{LABELS[kind]:<{width}}  {len(items):>5}  {shown}")
    ln = report["lengths"]
    lines.append("")
    lines.append(
        f"lengths ({ln['unit']}): min {ln['min']}, median {ln['median']:g}, p95 {ln['p95']}, max {ln['max']}"
        + (f"; max_length {ln['max_length']}" if ln["max_length"] else "")
    )
    edges, counts = ln["histogram"]["edges"], ln["histogram"]["counts"]
    peak = max(counts) or 1
    for a, b, c in zip(edges, edges[1:], counts):
        lines.append(f"  {a:>6}–{b:<6} {c:>6}  {'#' * max(1 if c else 0, round(40 * c / peak))}")
    return "\n".join(lines)


def warning_lines(report: dict) -> list[str]:
    out = []
    for kind in CHECKS:
        items = report["issues"][kind]
        if items:
            out.append(f"{len(items)} {LABELS[kind]}, e.g. {items[0]['where']} ({items[0]['detail']})")
    return out


def train_warnings(data_cfg) -> list[str]:
    """What `train` prints before it starts: one line per failing check, no tokenizer."""
    d = data_cfg
    evals = d.validation or (d.train if d.validation_split else [])
    report = check(
        d.train, evals, d.format, d.system_prompt, None, None, False, d.split, d.validation_split, d.subset, d.columns
    )
    lines = warning_lines(report)
    if lines:
        lines.append(
            "see: tunesmith data check "
            + " ".join(map(str, data_cfg.train))
            + (" --eval " + " ".join(map(str, evals)) if evals else "")
        )
    return lines
