"""tunesmith: adapt a pre-trained causal LM to a task or domain on the hardware you have.

The library API — each a function, imported lazily so `import tunesmith` stays cheap (no torch):
- `finetune(cfg)` trains per a `tunesmith.config.Config` (see `load_config`) and returns a
  `TrainResult` (output dir, model, tokenizer, summary);
- `compare(cfg)` runs the fine-tuned vs prompt vs RAG comparison (training the run first when
  it is not there) and returns the results dict written to `results.json`;
- `export_gguf(model, out_path=None, quant="f16", force=False)` writes a GGUF + Ollama Modelfile;
- `estimate(cfg, probe=True)` predicts peak RAM, seconds per step and disk (`tunesmith fit`).
A mistake in what is passed raises `tunesmith.errors.UserError` with one line naming the config key.
"""

from __future__ import annotations

import os

# transformers ≥ 5.25 swaps layers for "hub kernels" — code fetched from the Hugging Face Hub — on
# every `from_pretrained` when the `kernels` package is installed (it is a dependency), and swaps
# them again on `model.train()`, which silently removed the training fast paths' RMSNorm node.
# tunesmith runs offline and loads no remote code unless asked: off unless the user set it.
os.environ.setdefault("USE_HUB_KERNELS", "0")

__version__ = "0.1.0"
__all__ = ["compare", "estimate", "export_gguf", "finetune", "load_config"]


def load_config(path=None, overrides=()):
    """A validated `Config` from a YAML file (optional) and `key.sub=value` overrides."""
    from tunesmith.config import load_config as _load

    return _load(path, list(overrides))


def finetune(cfg):
    """Fine-tune per `cfg`; returns a `TrainResult`."""
    from tunesmith.infer.replay import prepare_replay
    from tunesmith.train.loop import run_training

    prepare_replay(cfg)  # data.replay_source=self: the base model's answers, once
    return run_training(cfg)


def compare(cfg) -> dict:
    """Fine-tuned vs prompt engineering vs RAG vs fine-tuned + RAG on `cfg.compare`'s questions."""
    from tunesmith.workflows.compare import compare_with_training

    return compare_with_training(cfg)


def export_gguf(model: str, out_path=None, quant: str = "f16", force: bool = False):
    """Write `model` (a run dir, HF model dir, .gguf or bundled name) as GGUF; returns its path."""
    from tunesmith.export.gguf import export_gguf as _export

    return _export(model, out_path, quant=quant, force=force)


def estimate(cfg, probe: bool = True, ram_gib: float | None = None):
    """Predicted peak RAM, s/step and disk of the run `cfg` describes (an `Estimate`)."""
    from tunesmith.train.fit import estimate as _estimate

    return _estimate(cfg, probe=probe, ram_gib=ram_gib)
