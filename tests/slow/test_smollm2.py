"""SmolLM2-135M-Instruct for real: bundled GGUF → safetensors cache, and the quickstart.

These take minutes on 2 cores; CI runs them (marker `slow`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunesmith.models import bundled_gguf, load_model, load_tokenizer, resolve_model

EXE = os.path.join(os.path.dirname(sys.executable), "tunesmith")


def test_bundled_model_converts_once_and_loads(slow_home):
    path = Path(resolve_model("smollm2-135m-instruct"))
    assert path.parent == slow_home / "models"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF tag is gone, so trainers accept it
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m-instruct") == str(path)  # cached: not converted again
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    model = load_model(str(path))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = load_tokenizer(str(path))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_gguf_file_path_converts_to_the_same_weights():
    gguf = bundled_gguf("smollm2-135m-instruct")
    from_file = Path(resolve_model(str(gguf)))
    bundled = Path(resolve_model("smollm2-135m-instruct"))
    assert from_file != bundled
    a, b = load_file(from_file / "model.safetensors"), load_file(bundled / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"))


def test_quickstart_learns_the_knowledge_base(quickstart_run, slow_home):
    out, proc = quickstart_run
    env = {**os.environ, "TUNESMITH_HOME": str(slow_home)}
    print(proc.stdout)
    result = json.loads((out / "quickstart.json").read_text())
    before, after = result["before"], result["after"]
    assert list(after) == ["seen", "doc_only", "general"]
    # paraphrases of the trained facts, never trained on themselves: learned, not memorised wording
    assert after["seen"]["accuracy"] >= before["seen"]["accuracy"] + 0.3
    assert "seen" in proc.stdout and "before" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()
    # the table is the comparison's own base and fine-tuned answers, not a second pass
    compared = json.loads((out / "compare" / "results.json").read_text())
    pairs = [(r["base"], r["finetuned"]) for r in compared["answers"]]
    assert [(r["before"], r["after"]) for r in result["answers"]] == pairs
    # the run dir chats: generate answers a held-out paraphrase with the trained fact
    q = next(r for r in result["answers"] if r["split"] == "seen" and r["answer"].lower() in r["after"].lower())
    gen = subprocess.run(
        [EXE, "generate", str(out), "--prompt", q["question"], "--max-new-tokens", "48"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert gen.returncode == 0, gen.stderr
    assert q["answer"].lower() in gen.stdout.lower()


def test_int4_block_32_stores_the_bundled_linears_exactly():
    """The bundled SmolLM2 comes from a Q4_1 GGUF: its linear weights sit on a 4-bit affine grid of
    32-weight blocks, so qlora's `quant_type: int4` at block 32 stores them without error (NF4 adds
    its own rounding on top of the GGUF's)."""
    from tunesmith.adapters.storage import quantize, quantize_int4

    model = load_model(resolve_model("smollm2-135m-instruct"))
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    assert len(linears) == 210
    for layer in linears:
        w = layer.weight.detach()
        err = (quantize_int4(w, 32).dequantize() - w).abs().max()
        assert err <= 1e-6 * w.abs().max(), float(err)
    w = linears[0].weight.detach()
    assert (quantize(w, 64).dequantize() - w).abs().max() > 1e-3 * w.abs().max()
