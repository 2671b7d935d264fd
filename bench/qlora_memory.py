"""QLoRA on CPU: memory of the frozen base, step time and validation loss against LoRA, and a
360M-class model that trains with qlora under a RAM budget where full fine-tuning does not.

    .venv/bin/python bench/qlora_memory.py                  # weights, train and budget
    .venv/bin/python bench/qlora_memory.py --parts weights  # weights · train · budget · rounding

Parts (each training run is its own `tunesmith train` process, so peak RSS is per run):
- weights: bytes of the frozen base weights (`nf4.storage_bytes`, exact) for fp32, bf16 and the
  qlora variants; ratios vs bf16. (RSS deltas after loading mislead: safetensors weights are
  mmapped and touched lazily; the peak RSS of the training runs below is the resident figure.)
  Models: the bundled SmolLM2-135M and a random-weight Llama with SmolLM2-360M's dimensions.
- train: LoRA vs QLoRA (NF4; and int4 in blocks of 32, GGUF Q4_1's layout) on the quickstart data (10% of it held
  out for validation loss), same config otherwise: median seconds per step, final validation loss, peak RSS.
- rounding (not in the default parts): what NF4 rounding alone costs the untrained SmolLM2 —
  validation loss on the train part's held-out 10% with every base linear replaced by its NF4
  round trip: absmax scales as `tunesmith.adapters.storage` makes them (blocks 64 and 32; scales in fp32
  unless marked double quant), and two per-block scale searches tried for issue 6 and not
  adopted (`search_scales`: least squared error; llama.cpp-style x²-weighted least squares);
  relative weight error and seconds to quantize the linears (one thread). Pass `--json` with
  another path, or it replaces the default report.
- budget: the 360M-class model, 2 steps of `full` and of `qlora`, each killed the moment its
  RSS passes `--budget-gib` (an OOM killer's view of a RAM budget); `tunesmith.train.fit.estimate`'s
  prediction for both, for comparison.
Prints a table per part and writes everything to `--json` (default out/bench/qlora_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXE = Path(sys.executable).with_name("tunesmith")
QUICKSTART = ROOT / "tunesmith" / "resources" / "quickstart" / "train.jsonl"
MIB = 1024**2
# One thread: on a shared 2-core machine, two OpenMP threads per process oversubscribe the cores
# and a step can take 50× longer; one thread each keeps the lora/qlora timings comparable.
THREADS = 1
SMOL_360M = dict(
    hidden_size=960,
    num_hidden_layers=32,
    num_attention_heads=15,
    num_key_value_heads=5,
    intermediate_size=2560,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# name → (adapter overrides, train.frozen_dtype); "fp32"/"bf16" are the plain base for reference
VARIANTS = {
    "fp32": ({"method": "full"}, "fp32"),
    "bf16": ({"method": "lora"}, "bf16"),
    "qlora": ({"method": "qlora"}, "fp32"),
    "qlora+bf16": ({"method": "qlora"}, "bf16"),
    "qlora+nf4-embeddings": ({"method": "qlora", "quantize_embeddings": True}, "fp32"),
    "qlora+nf4-embeddings,no-double-quant": (
        {"method": "qlora", "quantize_embeddings": True, "double_quant": False},
        "fp32",
    ),
    "qlora-int4-b32": ({"method": "qlora", "quant_type": "int4", "quant_block_size": 32}, "fp32"),
    "qlora-int4-b32+int4-embeddings": (
        {"method": "qlora", "quant_type": "int4", "quant_block_size": 32, "quantize_embeddings": True},
        "fp32",
    ),
}


def smollm2_dir() -> str:
    from tunesmith.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def make_360m_dir(path: Path) -> Path:
    """Random weights with SmolLM2-360M's shapes (no such model is available offline), stored in
    bf16 to halve the disk; the SmolLM2 tokenizer has the same 49,152-token vocabulary."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOL_360M)).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- weights


def base_bytes(model_dir: str) -> dict:
    """Bytes of the frozen base under each storage, compressed exactly as a run compresses it
    (every one of these tensors is read by each forward, so all of it is resident in training)."""
    import copy

    import torch

    from tunesmith.adapters.methods import compress_base
    from tunesmith.adapters.storage import storage_bytes
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    loaded = load_model(model_dir, dtype=torch.float32)
    loaded.requires_grad_(False)
    rows = {}
    for variant, (adapter, frozen) in VARIANTS.items():
        if variant == "fp32":
            rows[variant] = {"bytes": storage_bytes(loaded)}
            continue
        model = copy.deepcopy(loaded)
        if variant == "bf16":
            model.to(torch.bfloat16)
        else:
            compress_base(model, AdapterConfig(**adapter), frozen)
        rows[variant] = {"bytes": storage_bytes(model)}
        del model
    return rows


def part_weights(models: dict[str, str]) -> dict:
    results = {}
    for label, model_dir in models.items():
        rows = base_bytes(model_dir)
        bf16 = rows["bf16"]["bytes"]
        print(f"\nfrozen base weights, {label}")
        print(f"  {'storage':40s} {'MiB':>8s} {'× bf16':>7s}")
        for variant, row in rows.items():
            row["ratio_vs_bf16"] = round(row["bytes"] / bf16, 4)
            print(f"  {variant:40s} {row['bytes'] / MIB:8.1f} {row['ratio_vs_bf16']:7.3f}")
        results[label] = rows
    return results


# ---------------------------------------------------------------- training runs


def write_config(path: Path, model: str, out: Path, method_overrides: dict, train: dict, data: dict) -> Path:
    import yaml

    cfg = {
        "model": {"name": model},
        "data": {
            "train": [str(QUICKSTART)],
            "format": "messages",
            "max_length": 128,
            "system_prompt": "Answer briefly.",
            **data,
        },
        "adapter": {"rank": 16, "alpha": 32, **method_overrides},
        "train": {
            "output_dir": str(out),
            "batch_size": 2,
            "lr": 2e-3,
            "warmup_ratio": 0.05,
            "seed": 42,
            "progress": False,
            "threads": THREADS,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_under_budget(cmd: list[str], budget: float | None, env: dict, out: Path) -> dict:
    """Run cmd; sample its RSS every 20 ms and kill it once RSS passes `budget` bytes."""
    shutil.rmtree(out, ignore_errors=True)  # a previous bench's run dir would be refused
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    status = Path(f"/proc/{proc.pid}/status")
    peak, killed = 0, False
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        if budget and peak > budget:
            proc.kill()
            killed = True
            break
        time.sleep(0.02)
    output = proc.communicate()[0]
    return {
        "returncode": proc.returncode,
        "killed_over_budget": killed,
        "sampled_peak_rss": peak,
        "wall_s": round(time.perf_counter() - started, 1),
        "tail": output.strip().splitlines()[-3:],
    }


def run_summary(out: Path) -> dict:
    summary = json.loads((out / "run.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["tokens"] / r["tok_per_s"] for r in rows if "tok_per_s" in r]
    return {
        "final_val_loss": summary["final_val_loss"],
        "final_train_loss": summary["final_train_loss"],
        "median_step_s": round(statistics.median(step_s[1:] or step_s), 4),
        "peak_rss_mib": summary["peak_rss_mib"],
        "steps": summary["steps"],
    }


def part_train(work: Path, steps: int, env: dict, only: list[str] | None = None) -> dict:
    model = smollm2_dir()
    runs = {
        "lora": ({"method": "lora"}, "fp32"),
        "qlora": ({"method": "qlora"}, "fp32"),
        "qlora+nf4-embeddings": ({"method": "qlora", "quantize_embeddings": True}, "fp32"),
        # asymmetric 4-bit in GGUF Q4_1's blocks of 32: the bundled weights' own grid
        "qlora-int4-b32": ({"method": "qlora", "quant_type": "int4", "quant_block_size": 32}, "fp32"),
    }
    runs = {k: v for k, v in runs.items() if not only or k in only or k == "lora"}
    results = {}
    for name, (adapter, frozen) in runs.items():
        out = work / f"train-{name}"
        cfg = write_config(
            work / f"{name}.yaml",
            model,
            out,
            adapter,
            {"max_steps": steps, "frozen_dtype": frozen},
            {"val_fraction": 0.1},
        )
        run = run_under_budget([str(EXE), "train", str(cfg)], None, env, out)
        if run["returncode"] != 0:
            raise SystemExit(f"{name} failed: {run['tail']}")
        results[name] = run_summary(out)
    lora = results["lora"]
    print(f"\nquickstart data, SmolLM2-135M, {steps} steps, batch 2 × 128 tokens, 10% held out")
    print(f"  {'method':24s} {'val loss':>9s} {'vs lora':>8s} {'s/step':>7s} {'vs lora':>8s} {'peak RSS MiB':>13s}")
    for name, r in results.items():
        r["val_loss_vs_lora"] = round(r["final_val_loss"] / lora["final_val_loss"], 4)
        r["step_time_vs_lora"] = round(r["median_step_s"] / lora["median_step_s"], 3)
        print(
            f"  {name:24s} {r['final_val_loss']:9.4f} {r['val_loss_vs_lora']:8.3f} {r['median_step_s']:7.3f}"
            f" {r['step_time_vs_lora']:8.2f} {r['peak_rss_mib']:13.0f}"
        )
    return results


def fit_prediction(cfg_path: Path, budget_gib: float):
    try:
        from tunesmith.config import load_config
        from tunesmith.train.fit import estimate

        est = estimate(load_config(cfg_path), probe=False, ram_gib=budget_gib)
        return {"predicted_peak_mib": round(est.peak_bytes / MIB), "fits": est.fits_ram}
    except Exception as err:  # noqa: BLE001 — fit is another module's work; report, don't fail
        return {"error": f"{type(err).__name__}: {err}"}


def part_budget(work: Path, budget_gib: float, env: dict) -> dict:
    model_dir = make_360m_dir(work / "smol-360m-random")
    budget = budget_gib * 1024**3
    results = {}
    for name, adapter, frozen in (
        ("full", {"method": "full"}, "fp32"),
        ("qlora", {"method": "qlora"}, "fp32"),
        ("qlora+bf16", {"method": "qlora"}, "bf16"),
    ):
        out = work / f"budget-{name}"
        cfg = write_config(
            work / f"budget-{name}.yaml",
            str(model_dir),
            out,
            adapter,
            {"max_steps": 2, "frozen_dtype": frozen, "save_every": 0},
            {},
        )
        run = run_under_budget([str(EXE), "train", str(cfg)], budget, env, out)
        run["fit"] = fit_prediction(cfg, budget_gib)
        if run["returncode"] == 0:
            run.update(run_summary(out))
        results[name] = run
    print(f"\n360M-class Llama (random weights, SmolLM2-360M dims), 2 steps, batch 2 × 128, budget {budget_gib} GiB")
    print(f"  {'method':12s} {'result':28s} {'peak RSS MiB':>13s} {'fit predicts MiB':>17s} {'fit: fits':>10s}")
    for name, r in results.items():
        verdict = (
            "killed over budget"
            if r["killed_over_budget"]
            else ("trained" if r["returncode"] == 0 else f"exit {r['returncode']}")
        )
        fit = r["fit"]
        print(
            f"  {name:12s} {verdict:28s} {r['sampled_peak_rss'] / MIB:13.0f} {str(fit.get('predicted_peak_mib')):>17s}"
            f" {str(fit.get('fits')):>10s}"
        )
    return {"budget_gib": budget_gib, "runs": results}


# ---------------------------------------------------------------- rounding


def search_scales(block, factors, weighted: bool, refit: bool):
    """Per row of `block` (one NF4 block each) the scale among absmax × `factors` whose rounding
    has the least squared error — weighted by x² when `weighted` (llama.cpp's make_qx_quants) —
    each candidate's scale refitted by (weighted) least squares for its codes when `refit`."""
    import torch

    from tunesmith.adapters.storage import _MIDPOINTS, NF4_LEVELS

    tiny = torch.finfo(torch.float32).tiny
    absmax = block.abs().amax(1).clamp_min(tiny)
    y = block / absmax[:, None]
    wt = y.square() if weighted else torch.ones_like(y)
    best_r = best_err = None
    for f in factors:
        q = NF4_LEVELS[torch.bucketize(y, _MIDPOINTS * f)]
        num, den = (wt * y * q).sum(1), (wt * q * q).sum(1)
        r = torch.where(den > 0, num / den.clamp_min(tiny), f) if refit else torch.full_like(num, f)
        err = r * r * den - 2 * r * num  # Σ wt (r q − y)², less the constant Σ wt y²
        if best_err is None:
            best_r, best_err = r, err
        else:
            better = err < best_err
            best_r, best_err = torch.where(better, r, best_r), torch.where(better, err, best_err)
    return absmax * best_r


def round_trip(weight, block_size: int, double_quant: bool, search: dict | None):
    """NF4 quantize → dequantize: `tunesmith.adapters.storage` itself without `search`, else codes rounded to
    the nearest level at the searched scales, kept in fp32 (same codes and dequantization)."""
    import torch

    from tunesmith.adapters.storage import _MIDPOINTS, NF4_LEVELS, quantize

    if search is None:
        return quantize(weight, block_size, double_quant).dequantize()
    blocks = weight.reshape(-1, block_size).float()  # every SmolLM2 linear fills whole blocks
    out = torch.empty_like(blocks)
    step = max(1, (1 << 20) // block_size)
    for start in range(0, blocks.shape[0], step):
        block = blocks[start : start + step]
        scale = search_scales(block, **search)[:, None].clamp_min(torch.finfo(torch.float32).tiny)
        out[start : start + step] = NF4_LEVELS[torch.bucketize(block / scale, _MIDPOINTS)] * scale
    return out.view(weight.shape)


ROUNDING = {  # name → (block size, double quant, scale search or None for absmax)
    "absmax, block 64, double quant (default)": (64, True, None),
    "absmax, block 64": (64, False, None),
    "absmax, block 32": (32, False, None),
    "block 64, least-squares scale search": (
        64,
        False,
        dict(factors=(1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82), weighted=False, refit=False),
    ),
    "block 64, x²-weighted search + refit": (64, False, dict(factors=(1.0, 1.03, 1.06), weighted=True, refit=True)),
}


def part_rounding(work: Path) -> dict:
    import torch

    from tunesmith.config import load_config
    from tunesmith.data.packing import collate, pack, unpacked
    from tunesmith.data.sft import build_datasets, ensure_chat_template
    from tunesmith.models import load_model, load_tokenizer, tunesmith_home
    from tunesmith.train.loss import LossModule

    torch.set_num_threads(THREADS)
    model_dir = smollm2_dir()
    cfg = load_config(
        write_config(
            work / "rounding.yaml", model_dir, work / "rounding-out", {"method": "lora"}, {}, {"val_fraction": 0.1}
        )
    )
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    _, val, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed, tunesmith_home() / "data-cache")
    pad = tokenizer.pad_token_id
    rows = pack(val, cfg.data.max_length, pad) if cfg.data.packing else unpacked(val, pad)
    model = load_model(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}

    def val_loss() -> float:
        loss_module, total, count = LossModule(model).eval(), 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), cfg.train.batch_size):
                loss_sum, n = loss_module(**collate(rows[i : i + cfg.train.batch_size], pad))
                total, count = total + float(loss_sum), count + n
        return total / count

    results = {"fp32": {"val_loss": val_loss(), "rel_weight_err": 0.0, "quantize_s": 0.0}}
    for name, (block_size, double_quant, search) in ROUNDING.items():
        started, sq_err, sq_norm = time.perf_counter(), 0.0, 0.0
        for n, module in linears.items():
            module.weight.data = round_trip(original[n], block_size, double_quant, search)
        seconds = time.perf_counter() - started
        for n, module in linears.items():
            sq_err += float((module.weight - original[n]).double().square().sum())
            sq_norm += float(original[n].double().square().sum())
        results[name] = {
            "val_loss": val_loss(),
            "rel_weight_err": round((sq_err / sq_norm) ** 0.5, 5),
            "quantize_s": round(seconds, 1),
            "block_size": block_size,
        }
        print(f"  {name}: {results[name]}", flush=True)
    fp32 = results["fp32"]["val_loss"]
    print(f"\nuntrained SmolLM2-135M, base linears NF4-rounded, {len(rows)} held-out rows")
    print(f"  {'rounding':40s} {'val loss':>9s} {'vs fp32':>8s} {'weight err':>11s} {'quantize s':>11s}")
    for name, r in results.items():
        r["val_loss_vs_fp32"] = round(r["val_loss"] / fp32, 4)
        print(
            f"  {name:40s} {r['val_loss']:9.4f} {r['val_loss_vs_fp32']:8.3f} {r['rel_weight_err']:11.4f}"
            f" {r['quantize_s']:11.1f}"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="weights,train,budget")
    parser.add_argument("--steps", type=int, default=90, help="optimizer steps per training run (train part)")
    parser.add_argument(
        "--train-runs", nargs="*", help="train part: only these runs (lora always runs, as the reference)"
    )
    parser.add_argument("--budget-gib", type=float, default=3.0)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tunesmith-bench-qlora"))
    parser.add_argument("--json", default=str(ROOT / "out" / "bench" / "qlora_memory.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    parts = args.parts.split(",")
    report = {"cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
    if "weights" in parts:
        report["weights"] = part_weights(
            {"SmolLM2-135M": smollm2_dir(), "360M-class": str(make_360m_dir(work / "smol-360m-random"))}
        )
    if "train" in parts:
        report["train"] = part_train(work, args.steps, env, args.train_runs)
    if "budget" in parts:
        report["budget"] = part_budget(work, args.budget_gib, env)
    if "rounding" in parts:
        report["rounding"] = part_rounding(work)
    report["load_avg_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json} (load average {report['load_avg_start'][0]:.1f} → {report['load_avg_end'][0]:.1f})")


if __name__ == "__main__":
    main()
