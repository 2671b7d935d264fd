"""The fit estimate against the real thing: parameter counts, saved activations, refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.tiny import FAMILY_CONFIGS, make_family_model, make_tokenizer, write_config, write_qa_jsonl
from tunesmith.adapters.methods import apply_method, count_parameters
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.train import budget, fit, fit_report
from tunesmith.train.kernels import attach
from tunesmith.train.loss import LossModule


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """Wide enough (hidden 128, 6 layers) that activations are tens of MiB, well above the
    few MiB a process's baseline RSS wanders by."""
    path = tmp_path_factory.mktemp("wide-llama")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def config(tmp_path, model_dir, **train):
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=64)
    path = write_config(
        tmp_path / "c.yaml",
        model_dir,
        data,
        tmp_path / "out",
        data={"max_length": 256},
        train={"batch_size": 4, "forward_tokens": 0, **train},  # one forward per micro-batch unless a test says
    )
    return load_config(path)


@pytest.fixture(scope="module")
def probed(tmp_path_factory, wide_model_dir):
    """One probed estimate (LoRA, batch 4 × 256) shared by the tests below: probes cost seconds."""
    tmp = tmp_path_factory.mktemp("fit")
    cfg = config(tmp, wide_model_dir)
    cache = {}
    return cfg, fit.estimate(cfg, probe=True, _cache=cache), cache, tmp


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_counts_match_the_real_model(tmp_path, wide_model_dir, probed, method):
    cfg = config(tmp_path, wide_model_dir)
    cfg.adapter.method = method
    est = probed[1] if method == "lora" else fit.estimate(cfg, probe=False, _cache={"baseline": 0.0})
    model = apply_method(LlamaForCausalLM.from_pretrained(wide_model_dir), cfg.adapter)
    trainable, total = count_parameters(model)
    assert (est.trainable, est.params) == (trainable, total)
    assert est.parts["gradients"] == trainable * 4 and est.parts["optimizer"] == trainable * 8
    if method == "full":
        assert est.parts["weights"] == total * 4
    if method == "qlora":
        assert est.parts["weights"] < 0.5 * probed[1].parts["weights"]


def saved_bytes(model, batch, length, segment):
    """Bytes autograd keeps for backward in one real training forward of the whole model."""
    # as the loop runs it: padding-free rows, per-sample attention, the fused MLP, norms and groups
    attach(model, varlen=True)
    attach(model, mlp=True)
    attach(model, norm=True)
    attach(model, groups=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 300, (batch, length))
    positions = (torch.arange(length) % segment).expand(batch, length)
    labels = ids.clone()
    labels[positions < segment // 2] = -100
    ids, labels, positions = (t.reshape(1, -1) for t in (ids, labels, positions))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LossModule(model)(ids, labels, positions)
    return sum(seen.values())


def test_activations_extrapolated_from_shallow_probes(wide_model_dir, probed):
    cfg, est, cache, _ = probed
    segment = cache[("data", 256, True)][4]
    model = apply_method(LlamaForCausalLM.from_pretrained(wide_model_dir), cfg.adapter).train()
    real = saved_bytes(model, 4, 256, segment)
    # the estimate adds two layers' worth for backward's transient tensors (6 layers: +33%)
    assert real * 1.0 <= est.parts["activations"] <= real * 1.45
    ckpt = fit.estimate(
        fit_report.apply_overrides(cfg, ["train.gradient_checkpointing=true"]), probe=True, _cache=cache
    )
    assert ckpt.parts["activations"] < 0.6 * est.parts["activations"]
    assert ckpt.step_s > est.step_s  # the forward runs twice


def test_packed_rows_run_one_row_per_forward_by_default(probed):
    cfg, est, cache, _ = probed
    auto = fit.estimate(fit_report.apply_overrides(cfg, ["train.forward_tokens=auto"]), probe=True, _cache=cache)
    # packing on: a forward carries one 256-token row, not the micro-batch's four
    assert auto.parts["activations"] < 0.4 * est.parts["activations"]
    assert auto.tokens_per_step == est.tokens_per_step


def test_refusal_names_overrides_that_fit(probed):
    cfg, est, cache, _ = probed
    budget = (est.peak_bytes - 0.4 * est.parts["activations"]) / fit.GIB
    with pytest.raises(UserError) as err:  # the shared cache pins the baseline this process measured first
        fit_report.preflight(cfg, ram_gib=budget, cache=cache)
    msg = str(err.value)
    assert msg.startswith(f"predicted peak RAM {est.peak_bytes / fit.GIB:.2f} GiB exceeds the {budget:.2f} GiB")
    assert "; try " in msg and msg.endswith("or pass --force")
    overrides = msg.split("; try ")[1].split(" (predicted")[0].split()
    assert overrides and all("=" in o for o in overrides)
    assert fit.estimate(fit_report.apply_overrides(cfg, overrides), probe=False, ram_gib=budget, _cache=cache).fits
    assert fit_report.preflight(cfg, ram_gib=2 * est.peak_bytes / fit.GIB, cache=cache).fits


def test_probe_times_a_step(probed):
    cfg, est, _, _ = probed
    assert 0 < est.step_s < 60 and est.tokens_per_step == 4 * 256
    assert "s/step" in fit_report.table(cfg, est)


def test_ram_budget_overrides(monkeypatch):
    monkeypatch.setenv("TUNESMITH_RAM_GIB", "1.5")
    assert budget.ram_budget() == 1.5 * fit.GIB
    assert budget.ram_budget(3) == 3 * fit.GIB
    monkeypatch.setenv("TUNESMITH_RAM_GIB", "lots")
    with pytest.raises(UserError, match="TUNESMITH_RAM_GIB"):
        budget.ram_budget()
    monkeypatch.delenv("TUNESMITH_RAM_GIB")
    assert 0 < budget.ram_budget() < 1 << 50


def test_disk_refusal_line():
    est = fit.Estimate(peak_bytes=1, parts={}, step_s=None, disk_bytes=10 * fit.GIB, ram_budget=2, disk_free=fit.GIB)
    line = fit_report.verdict_line(load_config(None, ["data.train=x.jsonl"]), est, None)
    assert "10.00 GiB of disk" in line and "train.keep_last" in line


def test_heap_retention_is_limited_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert fit.limit_heap_retention() is True


@pytest.mark.parametrize(
    ("dtype", "frozen", "copy"),
    [(torch.float32, "bf16", "bf16 copy"), (torch.bfloat16, "bf16", None), (torch.float32, "fp32", "copies out")],
)
def test_loading_counts_the_file_read_beside_the_copy(tmp_path, wide_model_dir, probed, dtype, frozen, copy):
    """A bf16 run of an fp32 file holds every page of the file and the bf16 copy at the end of
    loading; a bf16 file is the weights themselves, so nothing more; an fp32 LoRA run over its own
    fp32 file stacks q/k/v and copies every other frozen weight out of the mapping, whose pages
    stay resident until the last copy is made."""
    folder = tmp_path / "m"
    LlamaForCausalLM.from_pretrained(wide_model_dir, dtype=dtype).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((wide_model_dir / name).read_bytes())
    data = write_qa_jsonl(tmp_path / "qa.jsonl", n=16)
    rows = {"max_length": 24, "packing": False}  # activations well below the file
    train = {"batch_size": 1, "frozen_dtype": frozen, "precision": frozen}
    cfg = load_config(write_config(tmp_path / "c.yaml", folder, data, tmp_path / "out", data=rows, train=train))
    file_bytes, dtypes = fit._weights_file(cfg.model.name)
    (path,) = folder.glob("*.safetensors")
    assert dtypes == {"F32" if dtype == torch.float32 else "BF16"}
    assert path.stat().st_size - 64_000 < file_bytes < path.stat().st_size  # all but the header
    est = fit.estimate(cfg, probe=False, _cache={"baseline": 0.0})
    p = est.parts
    beyond = p["weights"] + p["optimizer"] + p["activations"] + p["gradients"] + p["backward overlap"]
    copied = {"bf16 copy": est.params * 2.0, "copies out": p["weights"], None: 0.0}[copy]
    expected = file_bytes + copied - beyond - p["reused buffers"]
    if copy:
        assert p["loading (before step 1)"] == pytest.approx(expected)
    else:
        assert "loading (before step 1)" not in p and expected <= 0


def test_reused_buffers_are_those_of_a_real_step(wide_model_dir, probed):
    """The fused kernels' buffers are one per tag for every layer: the shallow probe's are the full
    model's, and the loss's are sized by the most labelled chunk (here at most CHUNK rows)."""
    from tunesmith.train.kernels import scratch
    from tunesmith.train.loss import CHUNK

    cfg, est, cache, _ = probed
    scratch.release()
    model = fit.probe_model(cfg, cache["hf"], 6, "fp32").model
    ids = torch.randint(0, 300, (1, 4 * 256))
    labels = ids.clone()
    labels[:, : 4 * 128] = -100
    positions = torch.arange(4 * 256)[None] % 256
    loss, n = LossModule(model)(ids, labels, positions)
    (loss / n).backward()
    layers = scratch.held_bytes(skip=("loss.",))
    vocab = model.get_input_embeddings().weight.shape[0]
    assert layers > 0
    assert layers + CHUNK * vocab * 4 >= est.parts["reused buffers"] >= layers


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_is_estimated(tmp_path, family):
    """Each family's probes build: Gemma 2 has no SDPA (eager, as training loads it), and the tiny
    models have fewer layers than the 3-layer probe, so per-layer lists (Qwen3's, Gemma's
    layer_types) are repeated, not cut."""
    tok = make_tokenizer()
    make_family_model(family, len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = config(tmp_path, tmp_path / "m")
    est = fit.estimate(cfg, probe=False, _cache={"baseline": 0.0})
    model = apply_method(AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager"), cfg.adapter)
    assert (est.trainable, est.params) == count_parameters(model)
    assert est.parts["activations"] > 0
