"""Continued pre-training of the real SmolLM2-135M-Instruct on the bundled Quillhaven corpus:
a few LoRA steps must lower its perplexity on held-out blocks of that text (before/after printed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")
CORPUS = Path(__file__).resolve().parents[2] / "tunesmith" / "resources" / "corpus" / "texts"


@pytest.mark.slow
def test_continued_pretraining_lowers_smollm2_perplexity_on_domain_text(tmp_path, slow_home):
    out = tmp_path / "cpt"
    env = {**os.environ, "TUNESMITH_HOME": str(slow_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            EXE,
            "pretrain",
            f"pretrain.corpus={CORPUS}",
            "pretrain.method=lora",
            "pretrain.block_size=128",
            "pretrain.val_fraction=0.1",
            "pretrain.max_steps=6",
            "pretrain.lr=2e-3",
            "pretrain.batch_size=2",
            "train.warmup_steps=1",
            "train.progress=false",
            f"train.output_dir={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "pretrain.json").read_text())
    print(proc.stdout)
    assert "perplexity on the validation text: before" in proc.stdout
    assert summary["val_perplexity"] < summary["before"]["val_perplexity"], summary
