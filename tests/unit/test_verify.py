"""`tunesmith export --verify`: the GGUF runs in llama-cpp-python and is held to the fp32 model.

llama_cpp is imported directly, not skipped: CI installs the `gguf` extra, and a missing
llama-cpp-python must fail these tests rather than hide them.
"""

import json
import math

import llama_cpp  # noqa: F401 — see the module docstring
import numpy as np
import pytest

from tests.unit.test_gguf_export import make_model_dir
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.export import verify as verify_mod
from tunesmith.export.gguf import export_gguf
from tunesmith.export.logits import CHUNK, divergence, nll_from_logits
from tunesmith.export.merge import load_merged
from tunesmith.export.verify import PROMPTS, eval_budget, eval_ids, same_greedy, verify_gguf


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("v64"))


@pytest.fixture(scope="module")
def reference(model64):
    return load_merged(str(model64))


@pytest.fixture(scope="module")
def ggufs(model64, tmp_path_factory):
    out = tmp_path_factory.mktemp("ggufs")
    return {q: export_gguf(str(model64), out / f"m-{q}.gguf", quant=q) for q in ("f32", "q8_0", "q4_0")}


def test_f32_gguf_is_the_pytorch_model(ggufs, reference):
    model, tok = reference
    ids = eval_ids(tok, max_tokens=eval_budget(model))
    assert len(ids) == 240  # the tiny model's context is 256
    result = verify_gguf(ggufs["f32"], model, tok, PROMPTS, [ids], quant="f32")
    assert result["prompts"] == len(PROMPTS) == 10
    assert result["prompt_ids_equal"] == 10  # llama.cpp's tokenizer reads the prompts as HF does
    assert result["greedy_match"] == 10, [d for d in result["details"] if not d["match"]]
    assert all(d["gguf"] == d["pytorch"] for d in result["details"])  # exact, not just a shared prefix
    assert abs(result["ppl_ratio"] - 1) < 1e-3
    assert result["passed"] and result["tok_s"] > 0 and result["eval_tokens"] == [240]
    # The same next-token distributions at every scored position: KL ~ 0, same top token.
    assert 0 <= result["kl"] <= 1e-6 and result["kl_p99"] <= 1e-6, result["kl"]
    assert result["top1"] == 100.0


def test_kl_is_positive_for_q4_0_and_shares_the_fp32_logits(ggufs, reference):
    model, tok = reference
    ids = eval_ids(tok, max_tokens=eval_budget(model))
    logits = verify_mod.torch_logits(model, ids)
    q4 = verify_gguf(ggufs["q4_0"], model, tok, PROMPTS[:1], [ids], quant="q4_0", reference_logits=[logits])
    f32 = verify_gguf(ggufs["f32"], model, tok, PROMPTS[:1], [ids], quant="f32", reference_logits=[logits])
    assert q4["kl"] > 1e3 * max(f32["kl"], 1e-12) and q4["kl_p99"] >= q4["kl"], (q4["kl"], f32["kl"])
    assert q4["ppl_fp32"] == f32["ppl_fp32"] == pytest.approx(verify_mod.torch_perplexity(model, ids), rel=1e-9)
    assert "kl" in verify_mod.result_cells(q4) and "top-1 %" in verify_mod.report_table([verify_mod.result_cells(q4)])


def test_kl_and_top1_by_hand():
    """KL(p ‖ q) = Σ p ln(p / q) over softmaxes of the logits, per position; logits shifted by a
    constant are the same distribution."""
    ref = np.array([[0.0, math.log(2), 0.0], [0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    got = np.array([[7.0, 7.0, 7.0], [5.0, 0.0, 0.0], [11.0, 12.0, 13.0]])
    kl, same = divergence(ref, got, 3)
    assert kl[0] == pytest.approx(2 * 0.25 * math.log(0.25 / (1 / 3)) + 0.5 * math.log(0.5 / (1 / 3)), abs=1e-12)
    p = np.exp([0.0, 0.0, 5.0]) / np.exp([0.0, 0.0, 5.0]).sum()
    assert kl[1] == pytest.approx(float((p * np.log(p / p[::-1])).sum()), abs=1e-12)
    assert kl[2] == pytest.approx(0.0, abs=1e-12)
    assert same.tolist() == [False, False, True]  # a three-way tie is token 0; 2 vs 0; shifted logits agree

    # More positions than one chunk: the same as row by row, in plain Python.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2 * CHUNK + 5, 6)), rng.normal(size=(2 * CHUNK + 5, 6))
    ids = rng.integers(0, 6, size=2 * CHUNK + 6).tolist()
    kl, same = divergence(a, b, len(a))
    for i in (0, CHUNK, len(a) - 1):
        pa, pb = np.exp(a[i]) / np.exp(a[i]).sum(), np.exp(b[i]) / np.exp(b[i]).sum()
        assert kl[i] == pytest.approx(sum(x * math.log(x / y) for x, y in zip(pa, pb)), rel=1e-10)
        assert same[i] == (a[i].argmax() == b[i].argmax())
    want = -np.mean([a[i, ids[i + 1]] - math.log(np.exp(a[i]).sum()) for i in range(len(a))])
    assert nll_from_logits(a, ids) == pytest.approx(want, rel=1e-12)


def test_q8_0_perplexity_within_2_percent(ggufs, reference):
    model, tok = reference
    result = verify_gguf(
        ggufs["q8_0"], model, tok, PROMPTS[:2], [eval_ids(tok, max_tokens=eval_budget(model))], quant="q8_0"
    )
    assert result["ppl_ratio"] < 1.02 and result["passed"]


def test_greedy_comparison_rule():
    stops = {2}
    assert same_greedy([5, 6, 7], [5, 6, 7], stops)
    assert same_greedy([5, 2], [5, 2], stops)
    assert not same_greedy([5, 6], [5, 7], stops)
    assert not same_greedy([5, 2], [5, 6, 7], stops)  # one side stopped early: a mismatch
    assert same_greedy(list(range(10, 50)), list(range(10, 42)) + [0], stops)  # only the first 32 count


def test_truncated_gguf_is_one_line(ggufs, reference, tmp_path):
    model, tok = reference
    cut = tmp_path / "cut.gguf"
    data = ggufs["f32"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        verify_gguf(cut, model, tok, PROMPTS[:1], quant="f32")
    assert "cut.gguf" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_cli_export_verifies_and_reports(tmp_path, model64, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    assert main(["export", str(model64), "--quant", "f16", "--out", str(out)]) == 0  # verifies by default
    printed = capsys.readouterr().out
    assert "| gguf f16" in printed and "| fp32 PyTorch" in printed and "10/10" in printed
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["verified"] and report["passed"] and report["quant"] == "f16"
    assert [r["format"] for r in report["table"]] == ["fp32 PyTorch", "gguf f16"]
    assert report["table"][1]["size_mib"] == pytest.approx(out.stat().st_size / 2**20)
    assert "KL vs fp32" in printed and "top-1 %" in printed
    assert report["verification"]["kl"] == report["table"][1]["kl"] < 1e-3 and report["table"][0]["kl"] == 0.0

    # A failed check keeps the file, says why in one WARNING line, and exits with 3.
    monkeypatch.setitem(verify_mod.THRESHOLDS, "q8_0", {"max_ppl_ratio": 0.5})
    q8 = tmp_path / "q8.gguf"
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["export", str(model64), "--quant", "q8_0", "--out", str(q8), "--eval-text", str(text)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tunesmith: WARNING:") and "perplexity" in err[0]
    report = json.loads((tmp_path / "q8.report.json").read_text())
    assert q8.is_file() and report["passed"] is False and report["eval_text"] == str(text)
    assert "try --quant" not in err[0]
    monkeypatch.setitem(verify_mod.THRESHOLDS, "q4_0", {"max_ppl_ratio": 0.5})  # a failed q4_0 names the K-quant
    assert main(["export", str(model64), "--quant", "q4_0", "--out", str(tmp_path / "f4.gguf")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("; for 4 bits try --quant q4_k_m")

    assert main(["export", str(model64), "--quant", "q4_0", "--out", str(tmp_path / "q4.gguf"), "--no-verify"]) == 0
    report = json.loads((tmp_path / "q4.report.json").read_text())
    assert report["verified"] is False and "passed" not in report

    capsys.readouterr()
    assert (
        main(["export", str(model64), "--out", str(tmp_path / "x.gguf"), "--eval-text", str(tmp_path / "no.txt")]) == 2
    )
    assert "--eval-text" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


def test_perplexity_threshold_holds_both_ways():
    """ "Within 2% of fp32" is two-sided: a file that scores 5% *below* the model it came from has
    drifted from it as much as one 5% above (requantizing a fine-tune can undo part of the tuning)."""
    base = {"greedy_match": 10, "prompts": 10, "ppl_fp32": 10.0}
    for ratio, ok in ((1.019, True), (0.981, True), (1.05, False), (0.95, False)):
        problems = verify_mod.failures({**base, "ppl": 10 * ratio, "ppl_ratio": ratio}, "q5_k_m" if ok else "q8_0")
        assert (not problems) == ok, (ratio, problems)
        assert ok or "allowed ±2%" in problems[0]
