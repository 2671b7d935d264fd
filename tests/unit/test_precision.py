"""bf16 asked for where it is emulated: one warning line per process and setting, and `fit` says so.

The suite pins `TUNESMITH_BF16_UNITS=0` (no bf16 matmul units); tests that need the host's own
answer stand in for the GEMM measurement, since the real one depends on the machine."""

import pytest
import torch

from tests.tiny import write_config, write_qa_jsonl
from tunesmith import precision
from tunesmith.config import TrainConfig, load_config
from tunesmith.precision import inference_dtype, resolve_precision
from tunesmith.train import fit, fit_report

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    precision._print_once.cache_clear()
    yield
    precision._print_once.cache_clear()


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("tunesmith: warning:")]


def test_bf16_without_units_warns_once(capsys):
    for _ in range(2):
        assert resolve_precision(TrainConfig(precision="bf16"), "lora", CPU) == ("bf16", "bf16")
    (line,) = _warnings(capsys)
    assert line.startswith("tunesmith: warning: train.precision=bf16: ")
    assert "no bf16 matmul units" in line and "emulated" in line and line.endswith("use fp32 or auto")


def test_auto_fp32_and_frozen_bf16_do_not_warn(capsys):
    resolve_precision(TrainConfig(), "lora", CPU)
    resolve_precision(TrainConfig(precision="fp32"), "full", CPU)
    # frozen bf16 weights are upcast for the fp32 matmuls: nothing is emulated
    assert resolve_precision(TrainConfig(frozen_dtype="bf16"), "lora", CPU) == ("fp32", "bf16")
    inference_dtype("auto", "cpu")
    inference_dtype("fp32", "cpu")
    assert _warnings(capsys) == []


def test_inference_bf16_warns_once_per_setting(capsys):
    for _ in range(2):
        assert inference_dtype("bf16", "cpu") == torch.bfloat16
    inference_dtype("bf16", "cpu", setting="compare.precision=bf16")
    lines = _warnings(capsys)
    assert len(lines) == 2
    assert lines[0].startswith("tunesmith: warning: bf16 weights (--precision / compare.precision): ")
    assert lines[1].startswith("tunesmith: warning: compare.precision=bf16: ")


def test_units_present_do_not_warn(capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "1")
    resolve_precision(TrainConfig(precision="bf16"), "lora", CPU)
    inference_dtype("bf16", "cpu")
    assert _warnings(capsys) == []


@pytest.mark.parametrize("ratio, warns", [(2.5, True), (0.5, False)])
def test_without_override_the_measured_gemm_decides(capsys, monkeypatch, ratio, warns):
    """A CPU without AMX may still have native bf16 dot products (AVX512-BF16) and run bf16 faster."""
    monkeypatch.delenv("TUNESMITH_BF16_UNITS")
    monkeypatch.setattr(precision, "_cpu_bf16_pays", lambda: False)
    monkeypatch.setattr(precision, "_cpu_bf16_time_ratio", lambda: ratio)
    resolve_precision(TrainConfig(precision="bf16"), "lora", CPU)
    lines = _warnings(capsys)
    assert len(lines) == warns
    if warns:
        assert "no bf16 matmul units (AMX)" in lines[0] and "2.5× fp32's time" in lines[0]


def test_fit_reports_emulated_bf16(tmp_path, tiny_model_dir):
    data = write_qa_jsonl(tmp_path / "qa.jsonl")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "out"))
    cache: dict = {}
    assert fit.estimate(cfg, probe=False, _cache=cache).warnings == []
    bf16 = fit_report.apply_overrides(cfg, ["train.precision=bf16"])
    est = fit.estimate(bf16, probe=True, _cache=cache)
    (note,) = est.warnings
    assert note.startswith("train.precision=bf16: ") and "emulated" in note
    assert note.endswith("the predicted s/step was measured in bf16, so it includes the slowdown")
    assert est.step_s > 0 and f"warning: {note}" in fit_report.table(bf16, est).splitlines()


@pytest.mark.parametrize(
    "amx, avx512_bf16, gemm_s, units",
    [
        (False, True, {"fp32": 3.0, "bf16": 1.0}, True),  # AVX512-BF16 without AMX, measured 3× faster
        (False, True, {"fp32": 1.2, "bf16": 1.0}, False),  # native but not faster enough
        (True, False, {"fp32": 7.0, "bf16": 1.0}, True),  # AMX granted
        (False, False, None, False),  # neither: emulated, and no GEMM is even timed
    ],
)
def test_native_bf16_is_amx_or_avx512_bf16_and_measured(monkeypatch, amx, avx512_bf16, gemm_s, units):
    monkeypatch.delenv("TUNESMITH_BF16_UNITS")
    monkeypatch.setattr(precision, "_amx_granted", lambda: amx)
    monkeypatch.setattr(precision, "_avx512_bf16", lambda: avx512_bf16)
    timed = []

    def gemms(*args, **kwargs):
        timed.append(args)
        return {torch.float32: gemm_s["fp32"], torch.bfloat16: gemm_s["bf16"]}

    monkeypatch.setattr(precision, "_fastest_gemms", gemms)
    precision._cpu_bf16_pays.cache_clear()
    try:
        assert precision.bf16_matmul_units(CPU) is units
        assert bool(timed) == (gemm_s is not None)
    finally:
        precision._cpu_bf16_pays.cache_clear()
