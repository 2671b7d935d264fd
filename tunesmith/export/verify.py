"""Check an exported model against the fp32 PyTorch model it came from, and measure it.

Contract:
- `eval_ids(tokenizer, text_path=None, max_tokens)` (through `text_ids`, which the importance matrix
  shares) → the first `max_tokens` (`EVAL_TOKENS`, or
  `eval_budget(model)` for a model with a shorter context) token ids of the validation text
  (default: the bundled `general_text.txt`). Both sides of a perplexity comparison score
  these same ids, so a tokenizer difference can never pass for a quality difference.
- `torch_logits(model, ids)`, `torch_perplexity(model, ids)`, `torch_greedy(model, tokenizer, prompt, n)`
  and `torch_speed(...)` measure a PyTorch model (fp32 reference or `quantize.py`'s int8/int4).
- `divergence(reference_logits, logits, n)` → per position, KL(softmax(reference) ‖ softmax(logits))
  in nats and whether the argmax tokens agree (`logits.py`).
- `verify_gguf(gguf_path, reference_model, tokenizer, prompts=PROMPTS, texts=None, quant=None,
  reference_logits=None, reference_greedy=None, lora_path=None)` runs the GGUF in llama-cpp-python
  (the fp32 side's logits and greedy tokens computed unless given) and returns a dict:
    greedy: each prompt (rendered with the HF chat template, tokenized by llama.cpp with BOS as
      the GGUF says) decoded greedily for `GREEDY_TOKENS` tokens, compared with HF `generate`
      (do_sample=False). A prompt matches when the token lists are equal, or when both stopped at
      an end-of-turn token and the shorter one is a prefix of the longer one.
    perplexity of the GGUF (log-softmax of llama.cpp's logits) and of the fp32 model on the same
      ids, their ratio, and llama.cpp's generation speed (new tokens / wall time, prompt included).
    kl / kl_p99 / top1: from the same two sets of logits, the mean and 99th percentile over the
      scored positions of KL(fp32 ‖ GGUF) of the next-token distributions, and the % of positions
      whose most likely token is the same — `llama-perplexity --kl-divergence`'s "Mean KLD" and
      "Same top p". Reported, not a gate: unlike the perplexity ratio it cannot come out *better*
      than fp32 by chance (on a fine-tune, requantization can move perplexity either way).
    `passed` applies the thresholds in `THRESHOLDS` for `quant`: f32/f16 must match on at least
      9 of 10 prompts; q8_0's perplexity within 2% of fp32 (either way), q4_0's within 10%; the K-quants
      (made by llama.cpp) q6_k within 1%, q5_k_m 2%, q4_k_m 5%; "lora" (a base GGUF with
      `lora_path`, a LoRA GGUF, on top) must match the merged model on 9 of 10 prompts.
  A truncated or unreadable GGUF is a one-line `UserError`, before llama.cpp sees it.
- `verify_export(model_spec, gguf_path, quant, eval_text, verify)` is what `tunesmith export` runs
  after writing: loads the fp32 reference (`load_merged`), measures both sides and writes
  `<name>.report.json` beside the GGUF (table rows, thresholds, `passed`, per-prompt tokens).
- `report_table(rows)` formats rows of {format, size_mib, ppl, ppl_ratio, kl, top1, tok_s, greedy} as text.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import UserError
from tunesmith.export.logits import divergence, nll_from_logits

GREEDY_TOKENS = 32
EVAL_TOKENS = 512
N_THREADS = 2
SEED = 0
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "resources" / "quickstart" / "general_text.txt"
# Short, general questions: nothing a fine-tune on the quickstart facts would have memorised.
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "How many days are in a leap year?",
    "What do bees make?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Which planet is closest to the Sun?",
    "What language is spoken in Brazil?",
    "Write one sentence about the sea.",
)
THRESHOLDS = {
    "f32": {"min_greedy_fraction": 0.9},
    "f16": {"min_greedy_fraction": 0.9},
    "q8_0": {"max_ppl_ratio": 1.02},
    "q4_0": {"max_ppl_ratio": 1.10},
    "q6_k": {"max_ppl_ratio": 1.01},
    "q5_k_m": {"max_ppl_ratio": 1.02},
    "q4_k_m": {"max_ppl_ratio": 1.05},
    "lora": {"min_greedy_fraction": 0.9},  # base GGUF + LoRA GGUF against the merged fp32 model
}


def eval_ids(tokenizer, text_path=None, max_tokens: int = EVAL_TOKENS) -> list[int]:
    path = Path(text_path).expanduser() if text_path else DEFAULT_TEXT
    return text_ids(tokenizer, path, [path], max_tokens, "eval_text", "a UTF-8 text file", "perplexity")


def text_ids(tokenizer, path: Path, files: list[Path], max_tokens: int, key: str, expected: str, use: str) -> list[int]:
    """The first `max_tokens` token ids of `files` joined by blank lines; unreadable or too short
    text is one `UserError` naming `path` and `key`."""
    try:
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}); expected {expected}", key=key) from None
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UserError(f"{path} has fewer than 2 tokens; {use} needs some text", key=key)
    return ids


def eval_budget(model) -> int:
    """Tokens of validation text to score: `EVAL_TOKENS`, less for a model trained on shorter context
    (positions past it measure extrapolation, not the export, and llama.cpp warns about them)."""
    limit = getattr(model.config, "max_position_embeddings", None) or EVAL_TOKENS + 16
    return max(2, min(EVAL_TOKENS, limit - 16))


@torch.no_grad()
def torch_logits(model, ids: list[int]) -> np.ndarray:
    """The model's float32 logits at every position of `ids` (len(ids) × vocab)."""
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def torch_perplexity(model, ids: list[int]) -> float:
    return math.exp(nll_from_logits(torch_logits(model, ids), ids))


def end_ids(tokenizer) -> set[int]:
    from tunesmith.infer.generate import stop_ids

    return set(stop_ids(tokenizer))


def chat_prompt(tokenizer, question: str) -> str:
    from tunesmith.infer.generate import render_prompt

    return render_prompt(tokenizer, [{"role": "user", "content": question}])


@torch.no_grad()
def torch_greedy(model, tokenizer, prompt_ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """HF greedy decoding; the returned list ends with the stop token when the model stopped."""
    stops = sorted(end_ids(tokenizer))
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
    )[0, len(prompt_ids) :].tolist()
    return _cut(out, set(stops))


def _cut(tokens: list[int], stops: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[: i + 1]
    return tokens


def torch_speed(model, tokenizer, prompts=PROMPTS, n: int = GREEDY_TOKENS) -> tuple[float, list[list[int]]]:
    """(new tokens per second, the greedy tokens) over the prompts, prompt processing included."""
    tokens, total, elapsed = [], 0, 0.0
    for question in prompts:
        ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        out = torch_greedy(model, tokenizer, ids, n)
        elapsed += time.perf_counter() - start
        tokens.append(out)
        total += len(out)
    return total / max(elapsed, 1e-9), tokens


def same_greedy(a: list[int], b: list[int], stops: set[int], n: int = GREEDY_TOKENS) -> bool:
    a, b = a[:n], b[:n]
    if a == b:
        return True
    # Both ended at end-of-turn: only the shared part exists on both sides to compare.
    if a and b and a[-1] in stops and b[-1] in stops:
        k = min(len(a), len(b))
        return a[:k] == b[:k]
    return False


# ------------------------------------------------------------------ llama.cpp side


def open_gguf(gguf_path, n_ctx: int, lora_path=None):
    """A `llama_cpp.Llama` with every position's logits kept (and a LoRA GGUF applied when
    `lora_path` is given); unreadable files fail in one line."""
    import llama_cpp

    from tunesmith.models import check_gguf

    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"{path}: not found; expected a .gguf file")
    check_gguf(path)
    if lora_path:
        check_gguf(Path(lora_path))
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=N_THREADS,
            logits_all=True,
            seed=SEED,
            lora_path=str(lora_path) if lora_path else None,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: llama.cpp cannot load this GGUF ({first}); it may be truncated or corrupt") from None


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`: a view into `llm.scores`, valid until the next eval."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)]


def llama_greedy(llm, prompt_ids: list[int], stops: set[int], n: int = GREEDY_TOKENS) -> list[int]:
    """Argmax of llama.cpp's logits, token by token: the same rule as HF's greedy search."""
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if tok in stops or len(out) == n:
            break
        llm.eval([tok])
    return out


def _add_bos(llm) -> bool:
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"


def verify_gguf(
    gguf_path,
    reference_model,
    tokenizer,
    prompts=PROMPTS,
    texts=None,
    quant: str | None = None,
    reference_logits: list[np.ndarray] | None = None,
    reference_greedy: list[list[int]] | None = None,
    lora_path=None,
) -> dict:
    """See the module docstring. `texts` is a list of token-id lists (default: `eval_ids`);
    `reference_logits`, one array per text (`torch_logits`), spares the fp32 forward passes."""
    ids_list = texts if texts is not None else [eval_ids(tokenizer, max_tokens=eval_budget(reference_model))]
    longest_prompt = max(
        len(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts
    )
    n_ctx = max(max(len(ids) for ids in ids_list), longest_prompt + GREEDY_TOKENS + 8) + 8
    llm = open_gguf(gguf_path, n_ctx, lora_path)
    try:
        stops = end_ids(tokenizer) | {llm.token_eos()}
        matches, prompt_ids_equal, details, total, elapsed = 0, 0, [], 0, 0.0
        for i, question in enumerate(prompts):
            text = chat_prompt(tokenizer, question)
            hf_prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            ll_prompt = llm.tokenize(text.encode("utf-8"), add_bos=_add_bos(llm), special=True)
            prompt_ids_equal += ll_prompt == hf_prompt
            start = time.perf_counter()
            got = llama_greedy(llm, ll_prompt, stops)
            elapsed += time.perf_counter() - start
            total += len(got)
            want = reference_greedy[i] if reference_greedy else torch_greedy(reference_model, tokenizer, hf_prompt)
            ok = same_greedy(got, want, stops)
            matches += ok
            details.append({"prompt": question, "match": ok, "gguf": got, "pytorch": want})
        ppls, ref, kls, same = [], [], [], []
        for i, ids in enumerate(ids_list):
            # One text's logits on each side at a time (each len(ids) × vocab float32).
            fp32 = reference_logits[i] if reference_logits is not None else torch_logits(reference_model, ids)
            gguf = llama_logits(llm, ids)
            ppls.append(math.exp(nll_from_logits(gguf, ids)))
            ref.append(math.exp(nll_from_logits(fp32, ids)))
            kl, top = divergence(fp32, gguf, len(ids) - 1)
            kls.append(kl)
            same.append(top)
            del fp32, gguf
    finally:
        if hasattr(llm, "close"):  # frees llama.cpp's context now rather than at interpreter exit
            llm.close()
    kls, same = np.concatenate(kls), np.concatenate(same)
    result = {
        "gguf": str(gguf_path),
        "quant": quant,
        "prompts": len(prompts),
        "greedy_tokens": GREEDY_TOKENS,
        "greedy_match": matches,
        "prompt_ids_equal": prompt_ids_equal,
        "eval_tokens": [len(ids) for ids in ids_list],
        "ppl": float(np.mean(ppls)),
        "ppl_fp32": float(np.mean(ref)),
        # Over every scored position of every text (as llama.cpp pools them): mean and 99th
        # percentile of KL(fp32 ‖ GGUF) in nats, and % of positions whose top token is the same.
        "kl": float(kls.mean()),
        "kl_p99": float(np.percentile(kls, 99)),
        "top1": 100.0 * float(same.mean()),
        "tok_s": total / max(elapsed, 1e-9),
        "details": details,
    }
    result["ppl_ratio"] = result["ppl"] / result["ppl_fp32"]
    result["failures"] = failures(result, quant)
    result["passed"] = not result["failures"]
    return result


def failures(result: dict, quant: str | None) -> list[str]:
    rule = THRESHOLDS.get(quant or "", {})
    problems = []
    if "min_greedy_fraction" in rule and result["greedy_match"] < rule["min_greedy_fraction"] * result["prompts"]:
        problems.append(
            f"greedy tokens match PyTorch on {result['greedy_match']}/{result['prompts']} prompts "
            f"(need ≥ {math.ceil(rule['min_greedy_fraction'] * result['prompts'])})"
        )
    # Two-sided: a file scoring far *below* fp32 has drifted from the model as much as one above it
    # (on a fine-tune, requantization noise can undo part of the tuning and move general-text
    # perplexity toward the base model's).
    if "max_ppl_ratio" in rule and abs(result["ppl_ratio"] - 1) > rule["max_ppl_ratio"] - 1:
        problems.append(
            f"perplexity {result['ppl']:.3f} is {100 * (result['ppl_ratio'] - 1):+.1f}% vs fp32 "
            f"{result['ppl_fp32']:.3f} (allowed ±{100 * (rule['max_ppl_ratio'] - 1):.0f}%)"
        )
    return problems


def report_table(rows: list[dict]) -> str:
    """Rows of {format, size_mib, ppl, ppl_ratio, kl, top1, tok_s, greedy}; a missing value prints as '-'."""
    head = ("format", "size MiB", "ppl", "ppl/fp32", "KL vs fp32", "top-1 %", "tok/s", "greedy = fp32")
    fmt = {
        "size_mib": "{:.1f}",
        "ppl": "{:.3f}",
        "ppl_ratio": "{:.4f}",
        "kl": "{:.6f}",
        "top1": "{:.1f}",
        "tok_s": "{:.1f}",
    }
    body = [
        [str(r.get("format", "-"))]
        + [fmt[k].format(r[k]) if r.get(k) is not None else "-" for k in fmt]
        + [str(r.get("greedy") or "-")]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def result_cells(result: dict) -> dict:
    """A verification result as the cells of its table row."""
    greedy = f"{result['greedy_match']}/{result['prompts']}"
    cells = {k: result[k] for k in ("ppl", "ppl_ratio", "kl", "top1", "tok_s")}
    return {**cells, "greedy": greedy}


def mib(path) -> float:
    path = Path(path)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 2**20


def reference_row(model, tokenizer, ids: list[int], prompts=PROMPTS, logits=None) -> tuple[dict, list[list[int]]]:
    """The fp32 PyTorch row of the table (size = its fp32 weights) and its greedy tokens;
    `logits` (`torch_logits(model, ids)`, when the caller keeps them for `verify_gguf`) spares a pass."""
    tok_s, greedy = torch_speed(model, tokenizer, prompts)
    size = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    ppl = math.exp(nll_from_logits(logits, ids)) if logits is not None else torch_perplexity(model, ids)
    row = {
        "format": "fp32 PyTorch",
        "size_mib": size,
        "ppl": ppl,
        "ppl_ratio": 1.0,
        "kl": 0.0,
        "top1": 100.0,
        "tok_s": tok_s,
        "greedy": None,
    }
    return row, greedy


def write_report(path: Path, report: dict) -> Path:
    import json

    from tunesmith.io import write_atomic

    return write_atomic(path, json.dumps(report, indent=2) + "\n")


def report_path(gguf_path) -> Path:
    return Path(gguf_path).with_suffix(".report.json")


def verify_export(model_spec: str, gguf_path, quant: str, eval_text=None, verify: bool = True) -> dict:
    """Measure a written GGUF against the fp32 model `model_spec` names; write `<gguf>.report.json`.

    With `verify=False` only the size is reported. Returns the report (the table in docs/export-and-serve.md).
    """
    row = {"format": f"gguf {quant}", "size_mib": mib(gguf_path)}
    report = {"format": "gguf", "quant": quant, "path": str(gguf_path), "size_mib": row["size_mib"], "verified": verify}
    rows = [row]
    if verify:
        from tunesmith.data.sft import ensure_chat_template
        from tunesmith.export.merge import load_merged

        model, tokenizer = load_merged(model_spec)
        ensure_chat_template(tokenizer)  # as export_gguf did before embedding the template
        ids = eval_ids(tokenizer, eval_text, eval_budget(model))
        logits = torch_logits(model, ids)
        ref, ref_greedy = reference_row(model, tokenizer, ids, logits=logits)
        measure = dict(texts=[ids], quant=quant, reference_logits=[logits], reference_greedy=ref_greedy)
        result = verify_gguf(gguf_path, model, tokenizer, **measure)
        del logits, measure
        row.update(result_cells(result))
        rows = [ref, row]
        report.update(
            eval_text=str(eval_text or DEFAULT_TEXT),
            passed=result["passed"],
            failures=result["failures"],
            thresholds=THRESHOLDS.get(quant, {}),
            verification=result,
        )
    report["table"] = rows
    write_report(report_path(gguf_path), report)
    return report
