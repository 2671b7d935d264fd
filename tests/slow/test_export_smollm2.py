"""The quickstart's LoRA-tuned SmolLM2 exported to GGUF and run in llama.cpp, held to the issue's
thresholds: f16 greedy tokens equal PyTorch's on ≥ 9 of 10 prompts; q8_0 perplexity within 2% of
fp32, q4_0 within 10%. Plus int8/int4 PyTorch quantization. Minutes on 2 cores (marker `slow`).

The tuned (merged) model, not the bundled base: the base ships as Q4_1, so its weights already sit
on a 4-bit grid and re-quantizing them to q4_0 rounds twice (+17% perplexity even with a q8_0
head, measured) — a property of that file, not of the exporter.
"""

import json

import llama_cpp  # noqa: F401 — CI installs the gguf extra; these never skip
import pytest

from tunesmith.cli import main


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_export_verifies(tmp_path, quickstart_run, quant, capsys):
    out = tmp_path / f"smollm2-{quant}.gguf"
    code = main(["export", str(quickstart_run[0]), "--quant", quant, "--out", str(out), "--verify"])
    printed = capsys.readouterr().out
    print(printed)
    report = json.loads(out.with_suffix(".report.json").read_text())
    result = report["verification"]
    assert code == 0 and report["passed"], report["failures"]
    if quant == "f16":
        assert result["greedy_match"] >= 9
    else:
        assert result["ppl_ratio"] <= {"q8_0": 1.02, "q4_0": 1.10}[quant]
    assert result["prompt_ids_equal"] == 10


@pytest.mark.parametrize("method,max_ratio", [("int8", 1.02), ("int4", 1.10)])
def test_quantize_pytorch(tmp_path, quickstart_run, method, max_ratio, capsys):
    out = tmp_path / method
    assert main(["quantize", str(quickstart_run[0]), "--method", method, "--out", str(out)]) == 0
    print(capsys.readouterr().out)
    ref, row = json.loads((out / "report.json").read_text())["table"]
    # the fp32 embedding (tied output head) stays: 113 of SmolLM2's 513 MiB
    assert row["ppl_ratio"] <= max_ratio and row["size_mib"] < 0.45 * ref["size_mib"]
