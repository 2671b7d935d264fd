"""The export table of a LoRA run: every GGUF type, K-quants included, and the adapter as a GGUF LoRA.

    python bench/export_table.py RUN_DIR OUT_DIR [--quants f16 q8_0 q4_0 q6_k q5_k_m q4_k_m] [--no-adapter]

Writes each GGUF with `tunesmith.export_gguf` (K-quants by llama.cpp's quantizer) and the adapter
with `export_adapter` (base at f16) into OUT_DIR — nothing is written into RUN_DIR — then measures
each in llama.cpp against the merged fp32 model exactly as `tunesmith export --verify` does
(`verify.verify_gguf`; the fp32 reference, its logits included, is computed once). Prints the
markdown table (perplexity ratio, mean KL(fp32 ‖ GGUF) and top-1 agreement over the same token
ids), each file's tensor type mix, the thresholds' verdicts, and the adapter round trip: greedy
tokens of base f16 + LoRA GGUF against the merged f16 export, both in llama.cpp, prompt by prompt.
`--no-adapter` (or a run that is a full model, e.g. `bench/export_control.py`'s) skips the adapter.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import llama_cpp  # noqa: F401 — fail here, not halfway through, when the gguf extra is missing
from gguf import GGUFReader

from tunesmith import export_gguf
from tunesmith.data.sft import ensure_chat_template
from tunesmith.export import verify as v
from tunesmith.export.imatrix import calibration_windows, collect_imatrix, model_window
from tunesmith.export.kquant import K_QUANTS, export_kquant
from tunesmith.export.lora_gguf import export_adapter
from tunesmith.export.merge import load_merged

QUANTS = ["f16", "q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m"]


def type_mix(path: Path) -> str:
    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2)
    return ", ".join(f"{n}×{k}" for k, n in counts.most_common())


def row(name: str, result: dict, size: float) -> dict:
    return {"format": name, "size_mib": size, **v.result_cells(result)}


def verdict(name: str, result: dict) -> str:
    return f"{name}: {'pass' if result['passed'] else 'FAIL ' + '; '.join(result['failures'])}"


def round_trip(base: Path, adapter: Path, merged: Path, tokenizer, n_ctx: int) -> list[bool]:
    stops = v.end_ids(tokenizer)
    with_lora, whole = v.open_gguf(base, n_ctx, adapter), v.open_gguf(merged, n_ctx)
    try:
        same = []
        for question in v.PROMPTS:
            ids = tokenizer(v.chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
            same.append(v.llama_greedy(with_lora, ids, stops) == v.llama_greedy(whole, ids, stops))
        return same
    finally:
        with_lora.close()
        whole.close()


def measure_quants(run: str, out: Path, quants: list[str], imatrix: bool = True):
    """Export `run` to each of `quants` under `out` and verify each against its fp32 model.

    Returns (rows, verdicts, {quant: path}, model, tokenizer, measure), where `measure` holds the
    fp32 reference (ids, logits, greedy tokens) for further `verify_gguf` calls."""
    model, tokenizer = load_merged(run)
    ensure_chat_template(tokenizer)
    ids = v.eval_ids(tokenizer, max_tokens=v.eval_budget(model))
    logits = v.torch_logits(model, ids)  # len(ids) × vocab float32, kept for every row
    ref, ref_greedy = v.reference_row(model, tokenizer, ids, logits=logits)
    rows, verdicts, paths = [ref], [], {}
    measure = dict(texts=[ids], reference_logits=[logits], reference_greedy=ref_greedy)
    # The K-quants' importance matrix, measured once here exactly as export_kquant measures it.
    wanted = set(quants) & set(K_QUANTS) and imatrix
    weights = collect_imatrix(model, calibration_windows(tokenizer, window=model_window(model))) if wanted else None
    for quant in quants:
        target = out / f"model-{quant}.gguf"
        if quant in K_QUANTS:
            paths[quant] = export_kquant(run, target, quant, force=True, imatrix=weights or False)
        else:
            paths[quant] = export_gguf(run, target, quant=quant, force=True)
        result = v.verify_gguf(paths[quant], model, tokenizer, quant=quant, **measure)
        rows.append(row(f"gguf {quant}", result, v.mib(paths[quant])))
        verdicts.append(verdict(quant, result))
        print(rows[-1], flush=True)
    return rows, verdicts, paths, model, tokenizer, measure


def print_table(rows: list[dict], verdicts: list[str], paths: dict) -> None:
    print(v.report_table(rows))
    print("\n".join(verdicts))
    for quant, path in paths.items():
        print(f"{quant} matrices: {type_mix(path)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--quants", nargs="+", default=QUANTS)
    ap.add_argument("--no-imatrix", action="store_true", help="K-quants without the importance matrix")
    ap.add_argument("--no-adapter", action="store_true", help="skip the adapter rows (LoRA GGUF, round trip)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, verdicts, paths, model, tokenizer, measure = measure_quants(args.run, out, args.quants, not args.no_imatrix)
    if args.no_adapter:
        print_table(rows, verdicts, paths)
        return
    adapter, base, _ = export_adapter(args.run, out / "adapter.gguf", base_quant="f16", force=True)
    result = v.verify_gguf(base, model, tokenizer, quant="lora", lora_path=adapter, **measure)
    rows.append(row("gguf f16 base + LoRA GGUF", result, v.mib(adapter)))
    verdicts.append(verdict("f16 + LoRA", result))
    print_table(rows, verdicts, paths)
    print(f"adapter: {v.mib(adapter):.2f} MiB, base f16 {v.mib(base):.1f} MiB")
    if "f16" in paths:
        same = round_trip(base, adapter, paths["f16"], tokenizer, n_ctx=256)
        print(f"adapter round trip: base f16 + LoRA GGUF = merged f16 GGUF greedy tokens on {sum(same)}/{len(same)}")


if __name__ == "__main__":
    main()
