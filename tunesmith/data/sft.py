"""Examples → token samples with loss masks, for supervised fine-tuning; plus an on-disk cache.

Contract:
- `ensure_chat_template(tok, override)` leaves the tokenizer with a chat template: the override,
  else its own, else the ChatML fallback `CHATML` (see there).
- `tokenize_example(tok, ex, max_length, overlong, train_on_prompt)` returns a `Sample` whose
  `labels` are -100 wherever no loss is taken, and always at index 0 (in a packed row the token
  before a sample belongs to another sample, so its first token can never be predicted).
  Conversations: loss on each assistant message's content plus the end-of-turn text the template
  writes after it (`<|im_end|>`, `<|eot_id|>`, `</s>` …) so the model learns to stop; every
  assistant turn of a multi-turn conversation counts. With `train_on_prompt`, loss on all tokens.
  Text examples: the tokenizer's own special tokens (BOS if it adds one) plus EOS, all labelled.
  Longer than `max_length`: `truncate` keeps the first `max_length` tokens, `drop` returns None.
  A sample left with no labelled token (its answer truncated away) is also dropped (None).
- `build_datasets(data_cfg, tok, seed, cache_dir)` → `(train, validation, DataStats)`. Validation
  comes from `data_cfg.validation`, else a seeded `val_fraction` of the train examples (at least
  one), else is empty. Stats cover both splits. Results are cached under `cache_dir`, keyed by
  the sources' fingerprints (`data/sources.py`), the tokenizer, the chat template, the relevant
  config and the seed; the cache is a safetensors file of flat int32 arrays (no pickle), written
  atomically. With `data.context`, training conversations also get copies carrying retrieved
  chunks (`data/context.py`, retrieval settings from `compare`); the key then covers the documents.
  With `data.replay` a share of replay samples follows the training samples
  (`data/replay.py`); the replay settings and source's fingerprint are part of the cache key.
- Tool-call conversations (`data/tools.py`) render with `tools=`; a template that cannot write
  what a record holds is a `UserError` naming it. An assistant turn with tool calls is labelled
  from the end of the generation prompt to its end of turn (templates write calls in their own
  syntax), found by rendering the conversation up to it, which must prefix the whole rendering.

Masks come from character offsets: the conversation is rendered once, each assistant message is
located in that text (searching from where the template's rendering of the preceding messages
plus the generation prompt ends, so an answer that repeats the question is not mislabelled),
and the tokens of the whole rendering whose characters overlap those spans are labelled. The
tokens are thus exactly what `apply_chat_template` gives at inference, for any template that
writes message contents verbatim — including ones that inject a default system prompt (SmolLM2,
Qwen2.5) or trim contents (Llama-3).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data import tools as tool_defs
from tunesmith.data.formats import Example, check_columns, source_examples
from tunesmith.data.sources import open_sources
from tunesmith.errors import UserError

IGNORE = -100
CACHE_VERSION = 2  # bump whenever tokenisation or masking changes, so old caches are not reused

# ChatML, the template of SmolLM2/Qwen without their default system prompts. Used only when the
# tokenizer has no template of its own (base models). If the vocabulary lacks <|im_start|> and
# <|im_end|>, they are tokenised as ordinary text: no tokens are added and no embedding is resized,
# so the fallback never changes the model; the end-of-turn text is still labelled.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    n_examples: int = 0  # records read (train + validation)
    n_truncated: int = 0
    n_dropped: int = 0  # too long with overlong=drop, or nothing left to learn after truncation
    n_tokens: int = 0  # in the kept samples
    n_label_tokens: int = 0
    n_replay: int = 0  # replay samples added to the training samples (data.replay, data/replay.py)
    from_cache: bool = False
    context: dict | None = None  # data.context: the ContextStats of the copies with context


def ensure_chat_template(tokenizer, override: str | None = None) -> None:
    if override is not None:
        tokenizer.chat_template = override
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        try:
            _render(tokenizer, probe, False)
        except Exception as err:  # jinja syntax and runtime errors have no common base worth naming
            raise UserError(
                f"config key data.chat_template: the template does not render a user/assistant exchange ({err})"
            ) from None
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML


def tokenize_example(tokenizer, ex: Example, max_length: int, overlong: str, train_on_prompt: bool) -> Sample | None:
    ids, labels = _tokenize(tokenizer, ex, train_on_prompt)
    sample, _ = _fit(ids, labels, max_length, overlong)
    return sample


# ---------------------------------------------------------------- tokenisation and masks


def _tokenize(tokenizer, ex: Example, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Full-length ids and labels (labels[0] already -100)."""
    if ex.text is not None:
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
    else:
        if tool_defs.uses_tools(ex):
            tool_defs.require_support(tokenizer, ex)
        text = _render_checked(tokenizer, ex.messages, False, ex.where, ex.tools)
        spans = [(0, len(text))] if train_on_prompt else _assistant_spans(tokenizer, ex, text)
        ids, labels = _label_spans(tokenizer, text, spans)
    if labels:
        labels[0] = IGNORE
    return ids, labels


def _fit(ids, labels, max_length: int, overlong: str) -> tuple[Sample | None, str]:
    status = "ok"
    if len(ids) > max_length:
        if overlong == "drop":
            return None, "dropped"
        ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
    if not any(label != IGNORE for label in labels):
        return None, "dropped"
    return Sample(input_ids=ids, labels=labels), status


def _render(tokenizer, messages, generation_prompt: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _render_checked(tokenizer, messages, generation_prompt: bool, loc: str, tools=None) -> str:
    try:
        return _render(tokenizer, messages, generation_prompt, tools)
    except Exception as err:  # templates raise their own errors (e.g. "roles must alternate")
        raise UserError(f"{loc}: the chat template rejected this conversation ({err})") from None


def _assistant_spans(tokenizer, ex: Example, text: str) -> list[tuple[int, int]]:
    """Character spans of `text` to train on: each assistant content plus its end-of-turn text."""
    spans, cursor = [], 0
    messages, tools = ex.messages, ex.tools
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if message.get("tool_calls"):
            spans.append(_call_span(tokenizer, ex, i, text, cursor))
            cursor = spans[-1][1]
            continue
        content = message["content"].strip()  # some templates trim (Llama-3); the stripped core is always there
        start = cursor
        if i > 0:
            try:
                before = _render(tokenizer, messages[:i], True, tools)
                start = max(start, _common_prefix(before, text))
            except Exception:  # a template may refuse a partial conversation; the cursor still holds
                pass
        a = text.find(content, start)
        if a < 0:
            raise UserError(
                f"{ex.where}: the chat template does not write assistant message {i + 1} verbatim, "
                "so its tokens cannot be found; set data.chat_template"
            )
        b = a + len(content)
        spans.append((a, b + len(_end_of_turn(tokenizer, messages[: i + 1], content, start, text, b, tools))))
        cursor = spans[-1][1]
    return spans


def _call_span(tokenizer, ex: Example, i: int, text: str, cursor: int) -> tuple[int, int]:
    """An assistant turn with tool calls (the template writes them in its own syntax): from the end
    of the generation prompt after the preceding messages to the end of the turn, both found by
    rendering the conversation up to that point, which must be a prefix of the whole rendering."""
    try:
        before = _render(tokenizer, ex.messages[:i], True, ex.tools)
        upto = _render(tokenizer, ex.messages[: i + 1], False, ex.tools).rstrip()
    except Exception:  # a template may refuse a partial conversation
        before = upto = None
    if before is None or not text.startswith(before) or not text.startswith(upto) or len(upto) <= len(before):
        raise UserError(
            f"{ex.where}: the chat template writes assistant message {i + 1} (tool calls) differently inside the "
            "conversation than at its end, so its tokens cannot be found; set data.chat_template"
        )
    return max(len(before), cursor), len(upto)


def _end_of_turn(tokenizer, upto: list[dict], content: str, start: int, text: str, b: int, tools=None) -> str:
    """What the template writes right after an assistant message, minus trailing whitespace:
    found by rendering the conversation up to and including that message."""
    try:
        rendered = _render(tokenizer, upto, False, tools)
        j = rendered.find(content, start)
        tail = rendered[j + len(content) :].rstrip() if j >= 0 else None
    except Exception:  # see _assistant_spans
        tail = None
    if tail and text.startswith(tail, b):
        return tail
    eos = tokenizer.eos_token
    if tail != "" and eos and text.startswith(eos, b):  # rendered differently in context; EOS still ends it
        return eos
    return ""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the longest equal prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _label_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (python) tokenizers have no offsets
        return _label_pieces(tokenizer, text, spans)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    k = 0
    for token, (s, e) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        if s < spans[k][1] and e > spans[k][0]:  # any overlap: a token straddling a boundary is learnt
            labels[token] = ids[token]
    return ids, labels


def _label_pieces(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Without offsets: tokenise the text piece by piece, cut at the span boundaries."""
    ids, labels, pos = [], [], 0
    for a, b in spans + [(len(text), len(text))]:
        for piece, learn in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE] * len(piece_ids)
        pos = b
    return ids, labels


# ---------------------------------------------------------------- datasets and cache


def build_datasets(
    data_cfg: DataConfig, tokenizer, seed: int, cache_dir: Path | None, compare=None
) -> tuple[list[Sample], list[Sample], DataStats]:
    """Returns (train samples, validation samples, DataStats). `compare` (a CompareConfig, default
    its defaults) gives `data.context` its documents and retriever settings."""
    if not data_cfg.train:
        raise UserError("config key data.train: no training data files given")
    ensure_chat_template(tokenizer, data_cfg.chat_template)
    check_columns(data_cfg.columns)
    train_src, val_src = open_sources(data_cfg)
    replay_src = None
    if data_cfg.replay:
        from tunesmith.data import replay

        replay_src = replay.open_replay(data_cfg, tokenizer, cache_dir)
    cache_path = None
    if cache_dir is not None:
        key = _cache_key(data_cfg, tokenizer, seed, train_src, val_src, compare, [replay_src] if replay_src else [])
        cache_path = Path(cache_dir) / f"sft-{key}.safetensors" if key else None
        cached = _load_cache(cache_path) if cache_path else None
        if cached is not None:
            return cached

    def examples(sources):
        fmt, system, columns = data_cfg.format, data_cfg.system_prompt, data_cfg.columns
        return [ex for src in sources for ex in source_examples(src, fmt, system, columns)]

    train_ex = examples(train_src)
    if val_src:
        val_ex = examples(val_src)
    elif data_cfg.val_fraction > 0:
        train_ex, val_ex = _split(train_ex, data_cfg.val_fraction, seed, data_cfg.train)
    else:
        val_ex = []
    stats = DataStats(n_examples=len(train_ex) + len(val_ex))
    train = _tokenize_all(tokenizer, train_ex, data_cfg, stats)
    if data_cfg.context:  # copies with retrieved chunks, after the plain samples
        from tunesmith.data.context import context_samples

        tokenize = lambda exs: _tokenize_all(tokenizer, exs, data_cfg, stats)  # noqa: E731
        train += context_samples(train_ex, data_cfg, _compare(compare), seed, tokenize, stats)
    val = _tokenize_all(tokenizer, val_ex, data_cfg, stats)
    if not train:
        raise UserError(
            f"{', '.join(map(str, data_cfg.train))}: no training samples left: {stats.n_dropped} of "
            f"{len(train_ex)} dropped (longer than data.max_length={data_cfg.max_length} with "
            f"data.overlong={data_cfg.overlong}, or nothing to learn within it); raise data.max_length"
        )
    if replay_src is not None:  # a share of general samples against forgetting; validation stays task data
        train = train + replay.replay_samples(data_cfg, tokenizer, replay_src, len(train), seed, stats)
    if cache_path is not None:
        _save_cache(cache_path, train, val, stats)
    return train, val, stats


def _split(examples: list[Example], fraction: float, seed: int, paths) -> tuple[list[Example], list[Example]]:
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise UserError(
            f"{', '.join(map(str, paths))}: {len(examples)} example(s) are too few to hold out "
            f"data.val_fraction={fraction}; add examples, give data.validation files, or set data.val_fraction=0"
        )
    held = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [ex for i, ex in enumerate(examples) if i in held]
    return train, val


def _tokenize_all(tokenizer, examples: list[Example], cfg: DataConfig, stats: DataStats) -> list[Sample]:
    samples = []
    for ex in examples:
        ids, labels = _tokenize(tokenizer, ex, cfg.train_on_prompt)
        sample, status = _fit(ids, labels, cfg.max_length, cfg.overlong)
        if status == "truncated":
            stats.n_truncated += 1
        if sample is None:
            stats.n_dropped += 1
            continue
        samples.append(sample)
        stats.n_tokens += len(sample.input_ids)
        stats.n_label_tokens += sum(label != IGNORE for label in sample.labels)
    return samples


def _compare(compare):
    from tunesmith.config import CompareConfig

    return compare if compare is not None else CompareConfig()


def _cache_key(cfg: DataConfig, tokenizer, seed: int, train_src, val_src, compare=None, replay_src=()) -> str | None:
    """sha256 over everything the samples depend on (each source by its fingerprint: a file's
    bytes, a folder's files' names/sizes/mtimes, a hub split's dataset fingerprint); None when a
    source cannot be read (the loader then reports it properly)."""
    from tunesmith import __version__

    h = hashlib.sha256()
    keys = ("format", "max_length", "overlong", "train_on_prompt", "system_prompt", "val_fraction")
    relevant = {k: getattr(cfg, k) for k in (*keys, "split", "validation_split", "subset", "columns", "replay")}
    h.update(json.dumps({"v": CACHE_VERSION, "tunesmith": __version__, "cfg": relevant, "seed": seed}).encode())
    for role, sources in (("train", train_src), ("validation", val_src), ("replay", replay_src)):
        for src in sources:
            fingerprint = src.fingerprint()
            if fingerprint is None:
                return None
            # with the name and type: a.txt and a.jsonl read differently
            h.update(f"\0{role}\0{Path(src.name).name}\0{src.kind}\0{fingerprint}".encode())
    if cfg.context:
        from tunesmith.data.context import documents_fingerprint

        h.update(f"\0context\0{documents_fingerprint(cfg, _compare(compare))}".encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = tokenizer.chat_template
    return json.dumps(
        {
            "class": type(tokenizer).__name__,
            "vocab": vocab,
            "template": template if isinstance(template, str) else json.dumps(template, sort_keys=True),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "special_ids": list(tokenizer.all_special_ids),
        },
        sort_keys=True,
    )


def _flat(samples: list[Sample], prefix: str) -> dict[str, np.ndarray]:
    lengths = [len(s.input_ids) for s in samples]
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32, count=int(offsets[-1]))
    labels = np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(offsets[-1]))
    return {f"{prefix}.input_ids": ids, f"{prefix}.labels": labels, f"{prefix}.offsets": offsets}


def _unflat(tensors: dict[str, np.ndarray], prefix: str) -> list[Sample]:
    ids = tensors[f"{prefix}.input_ids"].tolist()
    labels = tensors[f"{prefix}.labels"].tolist()
    offsets = tensors[f"{prefix}.offsets"].tolist()
    return [Sample(input_ids=ids[a:b], labels=labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _save_cache(path: Path, train: list[Sample], val: list[Sample], stats: DataStats) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {**_flat(train, "train"), **_flat(val, "val")}
        save_file(tensors, str(tmp), metadata={"stats": json.dumps(asdict(stats))})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    except OSError:  # a read-only or full cache dir costs only the next run's tokenisation
        tmp.unlink(missing_ok=True)


def _load_cache(path: Path):
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            stats = DataStats(**json.loads(f.metadata()["stats"]))
        train, val = _unflat(tensors, "train"), _unflat(tensors, "val")
    except Exception:  # a damaged or foreign cache file is rebuilt, never trusted
        return None
    stats.from_cache = True
    return train, val, stats
