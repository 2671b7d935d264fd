"""The weights `tunesmith compare`'s arms answer with, each set loaded once, and perplexity.

Contract: `Models(cfg, run_dir, saved_cfg)` loads the run (adapter or full) and, when an arm or the
forgetting text needs it and the run cannot provide it with its adapter off, the base model,
printing one "loading …" line per load. `for_arm(arm)` hands each arm its model, tokenizer and a
context manager that selects the weights (base arms of a LoRA run: the same model with the
adapter disabled; the fine-tuned arms: the adapter merged in once, so base arms must run first).
`train_cost`, `size_mib` and `forgetting` report what the results file records about the weights;
`perplexity(model, tokenizer, text)` is per-token perplexity over 512-token blocks.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np

from tunesmith.config import Config
from tunesmith.eval.arms import uses_finetuned
from tunesmith.eval.questions import general_text
from tunesmith.rundir import RunDir


class Models:
    """Loads each set of weights once; hands each arm its model and a context that selects it."""

    def __init__(self, cfg: Config, run_dir: Path | None, saved: Config | None):
        import torch

        from tunesmith.infer.load import load_for_inference
        from tunesmith.precision import inference_dtype

        self.dtype = inference_dtype(cfg.compare.precision, "cpu")
        self.precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        self.run_dir, self.method, self.merged = run_dir, None, False
        self.base_name = RunDir(run_dir).base_model() if run_dir and RunDir(run_dir).kind == "adapter" else None
        needs_base = any(not uses_finetuned(a) for a in cfg.compare.arms) or cfg.compare.general_text
        self.tuned = self.base = None
        if run_dir is not None:
            on = f", adapter on {self.base_name}" if self.base_name else ""
            print(f"tunesmith compare: loading model {run_dir} ({self.precision}{on})", flush=True)
            self.tuned, self.tokenizer, _ = load_for_inference(str(run_dir), dtype=self.dtype)
            self.method = "adapter" if self.base_name else "full"
            if self.base_name is None:
                self.base_name = saved.model.name if saved else cfg.model.name
            if self.method == "adapter":
                self.method = saved.adapter.method if saved else "lora"
        else:
            self.base_name = cfg.model.name
        if needs_base and self.method in (None, "full"):
            print(f"tunesmith compare: loading model {self.base_name} ({self.precision})", flush=True)
            self.base, base_tok, _ = load_for_inference(self.base_name, dtype=self.dtype)
            if run_dir is None:
                self.tokenizer = base_tok

    def for_arm(self, arm: str):
        if uses_finetuned(arm):
            if self.method != "full" and not self.merged:
                # generation through unmerged LoRA layers costs two extra matmuls per linear per
                # token; folding the adapter in once makes the fine-tuned arms as fast as the base
                self.tuned.merge_adapter()
                self.merged = True
            return self.tuned, self.tokenizer, nullcontext
        if self.base is not None:
            return self.base, self.tokenizer, nullcontext
        if self.merged:
            raise RuntimeError("base arms must run before the adapter is merged")
        return self.tuned, self.tokenizer, self.tuned.disable_adapter  # LoRA run: same weights, adapter off

    def train_cost(self, arm: str) -> dict:
        run = RunDir(self.run_dir).summary() if self.run_dir else None
        if not uses_finetuned(arm) or run is None:
            return {"train_wall_s": 0.0 if not uses_finetuned(arm) else None, "train_peak_rss_mib": None}
        return {"train_wall_s": run.get("train_wall_s"), "train_peak_rss_mib": run.get("peak_rss_mib")}

    def size_mib(self, arm: str) -> float | None:
        from tunesmith.models import resolve_model

        base = Path(resolve_model(self.base_name))
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors")) if base.is_dir() else 0
        if not uses_finetuned(arm):
            return round(base_bytes / 2**20, 3)
        run_bytes = sum(p.stat().st_size for p in self.run_dir.glob("*.safetensors"))
        return round((run_bytes + (base_bytes if self.method != "full" else 0)) / 2**20, 3)

    def forgetting(self, spec: str) -> dict | None:
        loaded = general_text(spec)
        if loaded is None or self.tuned is None:
            return None
        name, text = loaded
        print(f"tunesmith compare: perplexity on {name}, base and fine-tuned", flush=True)
        base_model, _, ctx = self.for_arm("base")
        with ctx():
            base_ppl = perplexity(base_model, self.tokenizer, text)
        tuned_ppl = perplexity(self.tuned, self.tokenizer, text)  # unmerged adapter: exact
        return {
            "text": name,
            "base_ppl": round(base_ppl, 3),
            "finetuned_ppl": round(tuned_ppl, 3),
            "ratio": round(tuned_ppl / base_ppl, 4),
        }


def perplexity(model, tokenizer, text: str, block: int = 512) -> float:
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            piece = ids[start : start + block + 1].to(device)
            if len(piece) < 2:
                break
            logits = model(input_ids=piece[None, :-1]).logits[0].float()
            total += torch.nn.functional.cross_entropy(logits, piece[1:], reduction="sum").item()
            count += len(piece) - 1
    return float(np.exp(total / max(count, 1)))
