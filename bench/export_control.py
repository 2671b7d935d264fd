"""The export table's control: a never-quantized model whose every row is whole 256-wide K-quant blocks.

    python bench/export_control.py OUT_DIR [--hidden 512] [--intermediate 1536] [--steps 120] [--quants ...]

On SmolLM2 the K-quant files are mostly legacy blocks (its 576-wide rows are not multiples of 256)
and its bundled weights sit on a q4_1 grid, so perplexity ratios there mix two effects with the
export's own fidelity. This script takes both away: `tunesmith pretrain` trains a small Llama from
scratch (hidden `--hidden`, 4 layers, head size 64, intermediate `--intermediate`, its own 1024-token
BPE vocabulary) on the bundled corpus and quickstart documents for `--steps` steps at one thread —
a weak model, never quantized — into OUT_DIR/model; then `export_table.measure_quants` exports it
to each GGUF type (K-quants by llama.cpp's quantizer with tunesmith's importance matrix, as
`tunesmith export` does) under OUT_DIR/gguf and prints the same table: perplexity ratio, mean
KL(fp32 ‖ GGUF), top-1 agreement, greedy agreement and each file's tensor type mix. `--hidden 576`
(9 heads) gives the same model at SmolLM2's width, where llama.cpp falls back to legacy types.
A pretrain already finished in OUT_DIR/model is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from export_table import QUANTS, measure_quants, print_table

from tunesmith.cli import main as cli

RESOURCES = Path(__file__).resolve().parents[1] / "tunesmith" / "resources"


def pretrain(out: Path, hidden: int, intermediate: int, steps: int) -> Path:
    model = out / "model"
    if (model / "pretrain.json").is_file():
        return model
    config = {
        "pretrain": {
            "corpus": [str(RESOURCES / "corpus" / "texts"), str(RESOURCES / "quickstart" / "documents")],
            "from_scratch": True,
            "hidden_size": hidden,
            "layers": 4,
            "heads": hidden // 64,
            "intermediate_size": intermediate,
            "vocab_size": 1024,
            "block_size": 128,
            "val_fraction": 0.1,
            "max_steps": steps,
            "lr": 1.0e-3,
            "batch_size": 8,
        },
        "train": {"output_dir": str(model), "threads": 1, "seed": 42, "progress": False, "log_every": 20},
    }
    path = out / "pretrain.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    start = time.perf_counter()
    if cli(["pretrain", str(path)]) != 0:
        sys.exit("pretrain failed")
    print(f"pretrain: {time.perf_counter() - start:.0f} s", flush=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--quants", nargs="+", default=QUANTS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = pretrain(out, args.hidden, args.intermediate, args.steps)
    (out / "gguf").mkdir(exist_ok=True)
    start = time.perf_counter()
    rows, verdicts, paths, *_ = measure_quants(str(model), out / "gguf", args.quants)
    print_table(rows, verdicts, paths)
    print(f"export + verification: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
