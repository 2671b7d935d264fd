"""Will this run fit? Predict peak RAM, seconds per step and disk before training.

Contract:
- `estimate(cfg, probe=True)` → `Estimate`: predicted peak RSS of the training process
  (bytes, with its parts), seconds per optimizer step, checkpoint + final-model disk bytes,
  the RAM and disk budgets of this machine, and `fits`. With `probe`, it times and measures a
  real forward/backward/AdamW step on 1- and 3-layer copies of the model (random weights,
  the real widths, the run's rows and micro-batch, capped at PROBE_TOKENS; timed TIME_ROUNDS
  times, depths alternating) and extrapolates linearly in layers; with `probe=False` the same
  copies run one untimed step (memory only, s/step None). The copies are prepared by the loop's
  own `train.model.make_trainable`. It reads the model's `config.json` and the tokenised data
  (cached by `build_datasets`), never the weights, and writes nothing into the output dir.
  The RAM and disk budgets come from `train.budget`; suggestions and the table from `train.fit_report`.
  `warnings` holds what the run should know before it starts: `train.precision=bf16` where bf16 is
  emulated (`precision.emulation_warning`); the probe then ran in bf16, so s/step already shows it.
- Under torchrun, the `LOCAL_WORLD_SIZE` processes of a node share its RAM: the peak is per
  process, the fit test uses the sum.

Why layers: a decoder's parameters, saved activations and FLOPs grow linearly with depth, so two
shallow probes give exact slopes for the widths that matter without loading any weights, while
the intercept captures the embeddings, the LM head and the loss.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.models import resolve_model, weights_file
from tunesmith.train.budget import GIB, current_rss, disk_free, limit_heap_retention, ram_budget

__all__ = ["GIB", "Estimate", "estimate", "limit_heap_retention", "probe_model"]
PROBE_LAYERS = (1, 3)
PROBE_TOKENS = 4096
TIME_ROUNDS = 3  # timed probes per depth, alternating depths (see estimate)
DATA_BYTES_PER_TOKEN = 120  # python ints in the sample and row lists (ids, labels, positions)
TRANSIENT_LAYERS = 2.0  # backward holds a layer's recomputed/grad tensors beside the saved ones


@dataclass
class Estimate:
    peak_bytes: float
    parts: dict  # name → bytes (baseline, weights, gradients, optimizer, activations, data)
    step_s: float | None
    disk_bytes: float
    ram_budget: float
    disk_free: float
    processes: int = 1
    params: int = 0
    trainable: int = 0
    tokens_per_step: int = 0
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def fits_ram(self) -> bool:
        return self.peak_bytes * self.processes <= self.ram_budget

    @property
    def fits_disk(self) -> bool:
        return self.disk_bytes <= self.disk_free

    @property
    def fits(self) -> bool:
        return self.fits_ram and self.fits_disk


# ---------------------------------------------------------------- probes


def _hf_config(cfg: Config):
    from transformers import AutoConfig

    resolved = resolve_model(cfg.model.name)
    try:
        return AutoConfig.from_pretrained(resolved, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model {cfg.model.name}: cannot read its config ({str(err).splitlines()[0]})") from None


def _weights_file(name: str) -> tuple[float, set]:
    return weights_file(Path(resolve_model(name)))


def _layers_of(hf_cfg) -> tuple[object, int]:
    text = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    n = getattr(text, "num_hidden_layers", None)
    if not n:
        raise UserError("model: its config has no num_hidden_layers; tunesmith fit cannot probe it")
    return text, int(n)


def _shallow(hf_cfg, n_layers: int):
    shallow = copy.deepcopy(hf_cfg)
    text, _ = _layers_of(shallow)
    text.num_hidden_layers = n_layers
    for key in ("layer_types", "sliding_window_pattern_list"):  # per-layer lists must match depth
        values = getattr(text, key, None)
        if isinstance(values, list) and values:  # cut, or repeated where the model has fewer layers
            setattr(text, key, [values[i % len(values)] for i in range(n_layers)])
    return shallow


def _precision(cfg: Config) -> tuple[str, str]:
    """The run's compute precision and frozen-weight dtype, `auto` settled as `train` settles it
    (the probe runs on the CPU, as the estimate is for a CPU run)."""
    import torch

    from tunesmith.precision import resolve_precision

    return resolve_precision(cfg.train, cfg.adapter.method, torch.device("cpu"))


def _warnings(cfg: Config, probe: bool) -> list[str]:
    """`train.precision=bf16` where this CPU emulates bf16 (frozen bf16 weights are upcast for fp32
    matmuls, so `train.frozen_dtype` never is)."""
    import torch

    from tunesmith.precision import emulation_warning

    line = emulation_warning("train.precision=bf16", torch.device("cpu")) if cfg.train.precision == "bf16" else None
    if line is None:
        return []
    return [line + ("; the predicted s/step was measured in bf16, so it includes the slowdown" if probe else "")]


def probe_model(cfg: Config, hf_cfg, n_layers: int, frozen_dtype: str):
    """An `n_layers` copy of the run's model with random weights, prepared exactly as the loop
    prepares it (`train.model.make_trainable`: the method, qlora's NF4 and frozen_dtype included,
    the fast paths the run turns on), on the CPU and for the number of processes the run will have.
    No gradient checkpointing even when the run has it: its own saved-tensor hooks would hide the
    layers from ours; its effect is arithmetic on the per-layer numbers (see `estimate`)."""
    import torch

    from tunesmith.train.distributed import Dist
    from tunesmith.train.model import make_trainable, random_base

    torch.manual_seed(0)
    model = random_base(cfg, _shallow(hf_cfg, n_layers), frozen_dtype)
    planned = Dist(world=int(os.environ.get("WORLD_SIZE", "1") or 1), strategy=cfg.train.strategy)
    fast = make_trainable(model, cfg, torch.device("cpu"), planned, frozen_dtype, checkpointing=False)
    fast.model.train()
    return fast


def _measure(
    cfg: Config,
    hf_cfg,
    n_layers: int,
    batch: int,
    row_lens,
    label_frac: float,
    segment: int | None,
    timed: bool,
    per_forward: int | None = None,
) -> dict:
    """Build an n-layer random copy, run AdamW steps at each row length; bytes and seconds. A step
    runs its `batch` rows in forwards of `per_forward` rows, as the loop splits a micro-batch
    (`train.forward_tokens`): the time is the whole step's, the saved bytes one forward's."""
    import torch

    from tunesmith.adapters.methods import count_parameters
    from tunesmith.adapters.storage import storage_bytes, stored_parameters
    from tunesmith.train.kernels import scratch
    from tunesmith.train.kernels.groups import copies_out
    from tunesmith.train.loss import LossModule, can_embed_into_grad

    precision, frozen_dtype = _precision(cfg)
    scratch.release()  # so that what the buffers hold afterwards is this probe's
    fast = probe_model(cfg, hf_cfg, n_layers, frozen_dtype)
    model, flat = fast.model, fast.flat
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    weight_bytes = storage_bytes(model) + sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as the loop runs it on one process
    # after grouping: grouped layers' weights are views of a new buffer, which is weights, not activations
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    step = LossModule(model, embed_into_grad=can_embed_into_grad(model))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    vocab = model.get_input_embeddings().weight.shape[0]
    result = {
        "trainable": trainable,
        "total": total,
        "weights": weight_bytes,
        "stored": stored_parameters(model),
        "saved": {},
        "seconds": {},
        "opt_s": None,
    }
    for length in row_lens:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(length))
        # packed rows restart positions per sample, which turns sdpa's causal fast path into a
        # masked one (more memory and time): the probe rows must look the same
        seg = segment or length
        positions = (torch.arange(length) % seg).expand(batch, length).contiguous()
        labels = ids.clone()
        labels[(positions < max(1, round(seg * (1 - label_frac))))] = -100
        step_rows = per_forward or batch
        forwards = [tuple(t[s : s + step_rows] for t in (ids, labels, positions)) for s in range(0, batch, step_rows)]
        if flat:  # [rows, length] → one row of rows × length tokens, positions restarting per row
            forwards = [tuple(t.reshape(1, -1) for t in f) for f in forwards]
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = storage.nbytes()
            return t

        best = math.inf
        # timed at the longest rows only: rep 0 warms up (allocations, AdamW state), then the
        # fastest of three, since a busy machine only ever adds time
        reps = 4 if timed and length == row_lens[-1] else 1
        for rep in range(reps):
            saved = 0
            start = time.perf_counter()
            for f_ids, f_labels, f_positions in forwards:
                seen.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
                    loss, n = step(f_ids, f_labels, f_positions if segment or flat else None)
                (loss / max(n, 1)).backward()
                saved = max(saved, sum(seen.values()))
            if rep > 0 or reps == 1:
                best = min(best, time.perf_counter() - start)
            opt_start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            opt_s = time.perf_counter() - opt_start
            if rep > 0:  # the first AdamW step allocates its state
                result["opt_s"] = opt_s if result["opt_s"] is None else min(result["opt_s"], opt_s)
        result["saved"][length] = float(saved)
        result["seconds"][length] = best
    # one buffer per tag serves every layer and lives for the run (the loss's: see `estimate`)
    result["buffers"] = float(scratch.held_bytes(skip=("loss.",)))
    result["copied_out"] = copies_out(fast.groups)
    return result


def _linear(x1, y1, x2, y2, x):
    slope = (y2 - y1) / (x2 - x1)
    return y1 + slope * (x - x1), slope


# ---------------------------------------------------------------- the estimate


def _data_shape(cfg: Config):
    """((row length at the peak, mean row length, label fraction, tokens, mean sample length,
    the largest label fraction of a sample), the tokenizer)."""
    from tunesmith.data.sft import IGNORE, build_datasets, ensure_chat_template
    from tunesmith.models import load_tokenizer, tunesmith_home

    tok = load_tokenizer(resolve_model(cfg.model.name), cfg.model.trust_remote_code, cfg.model.revision)
    ensure_chat_template(tok, cfg.data.chat_template)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else tunesmith_home() / "data-cache"
    train, val, stats = build_datasets(cfg.data, tok, cfg.train.seed, cache, cfg.compare)
    lengths = [len(s.input_ids) for s in train]
    tokens = sum(lengths)
    label_frac = max(1e-3, stats.n_label_tokens / max(1, stats.n_tokens))
    most_labelled = max(sum(label != IGNORE for label in s.labels) / max(1, len(s.labels)) for s in train)
    mean_sample = max(1, round(tokens / len(lengths)))
    if cfg.data.packing:
        return (cfg.data.max_length, cfg.data.max_length, label_frac, tokens, mean_sample, most_labelled), tok
    longest = max(lengths)
    # a micro-batch is padded to its longest row; on average about the p75 sample
    typical = sorted(lengths)[int(0.75 * (len(lengths) - 1))]
    return (longest, typical, label_frac, tokens, mean_sample, most_labelled), tok


def estimate(cfg: Config, probe: bool = True, ram_gib: float | None = None, _cache: dict | None = None) -> Estimate:
    import peft  # noqa: F401  (the baseline is a process that has torch, transformers and peft loaded)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    limit_heap_retention()
    _cache = {} if _cache is None else _cache
    hf_cfg = _cache.get("hf") or _cache.setdefault("hf", _hf_config(cfg))
    data_key = ("data", cfg.data.max_length, cfg.data.packing)
    if data_key not in _cache:
        _cache[data_key], tokenizer = _data_shape(cfg)
        _cache.setdefault("tokenizer", tokenizer)  # the run holds one all along (~40 MiB for SmolLM2's)
    # before any probe, once, with the tokenizer loaded
    baseline = _cache.setdefault("baseline", current_rss())
    peak_len, mean_len, label_frac, n_tokens, mean_sample, most_labelled = _cache[data_key]
    text, n_layers = _layers_of(hf_cfg)
    t = cfg.train
    method = cfg.adapter.method
    b = t.batch_size
    # probe at the real row length (so attention takes the same kernel and masks as training),
    # with at most PROBE_TOKENS per micro-batch: memory and time are linear in rows
    lens = (peak_len,)
    b_probe = max(1, min(b, PROBE_TOKENS // peak_len))
    # the loop's forwards (`train.forward_tokens`): each forward has a cost of its own (a full
    # fine-tune casts every weight to bf16 and adds every gradient once per forward)
    from tunesmith.train.rows import forward_budget

    budget = forward_budget(cfg)
    rows_pf = max(1, min(b_probe, budget // peak_len)) if budget else b_probe
    segment = min(mean_sample, peak_len) if cfg.data.packing and mean_sample < peak_len else None
    precision, frozen_dtype = _precision(cfg)
    key = ("probe", repr(cfg.adapter), precision, frozen_dtype, b_probe, rows_pf, lens, segment, probe)
    measure = functools.partial(_measure, cfg, hf_cfg, per_forward=rows_pf)
    if key not in _cache:
        runs = [measure(n, b_probe, lens, label_frac, segment, probe) for n in PROBE_LAYERS]
        # the per-layer time is a difference of two short timings, multiplied by the depth: on a
        # shared machine one slow burst skews it by 2×. Alternate the depths and keep the fastest
        for _ in range(TIME_ROUNDS - 1 if probe else 0):
            for r, n in zip(runs, PROBE_LAYERS):
                again = measure(n, b_probe, lens, label_frac, segment, probe)
                r["seconds"] = {k: min(v, again["seconds"][k]) for k, v in r["seconds"].items()}
                r["opt_s"] = min(r["opt_s"], again["opt_s"])
        _cache[key] = runs
    lo, hi = copy.deepcopy(_cache[key])
    for r in (lo, hi):  # scale the probe's rows up to the run's micro-batch
        for length in lens:
            r["saved"][length] *= b / rows_pf  # as if one forward took the micro-batch; split below
            r["seconds"][length] *= b / b_probe
    l1, l2 = PROBE_LAYERS

    def at_depth(a, c):
        return _linear(l1, a, l2, c, n_layers)

    total, _ = at_depth(lo["total"], hi["total"])
    trainable, per_layer_trainable = at_depth(lo["trainable"], hi["trainable"])
    outside_trainable = lo["trainable"] - l1 * per_layer_trainable  # embeddings, head, final norm
    weights, _ = at_depth(lo["weights"], hi["weights"])
    tied = getattr(text, "tie_word_embeddings", False) or getattr(hf_cfg, "tie_word_embeddings", False)
    grads = trainable * 4.0
    optimizer = trainable * 8.0  # AdamW: exp_avg and exp_avg_sq in fp32

    # saved activations of a micro-batch: linear in depth, and (sdpa) in row length
    def saved(r, length):
        return r["saved"][lens[-1]] * length / lens[-1]  # linear in row length (measured: 2.02× for 2×)

    layer_act = max(0.0, (saved(hi, peak_len) - saved(lo, peak_len)) / (l2 - l1))
    outside = max(0.0, saved(lo, peak_len) - l1 * layer_act)  # embeddings, final norm, head, loss
    from tunesmith.train.loss import CHUNK

    # a split micro-batch (train.forward_tokens) keeps one forward's activations at a time
    tokens_micro = b * peak_len
    if budget:
        per_forward = min(tokens_micro, max(budget, peak_len))
        layer_act, outside = layer_act * per_forward / tokens_micro, outside * per_forward / tokens_micro
        tokens_micro = per_forward
    # the head's logits exist for one chunk of CHUNK labelled tokens at a time, at the end of the
    # forward (the loss computes its gradients there), in reused buffers sized by the most labelled
    # chunk of the run (a row of long answers): in the compute dtype, plus an fp32 copy under bf16
    vocab = getattr(text, "vocab_size", 0) or 0
    labelled = tokens_micro * most_labelled
    loss_chunk = min(labelled, CHUNK) * vocab * (6.0 if precision == "bf16" else 4.0)
    if method == "qlora" and cfg.adapter.quantize_embeddings:  # NF4 head: its logits are saved (probed)
        loss_chunk = 0.0
    # the layers' reused buffers (norms, rope, SwiGLU: `kernels.scratch`), sized by a forward's tokens
    buffers = hi["buffers"] * tokens_micro / (rows_pf * peak_len) + loss_chunk
    hidden = getattr(text, "hidden_size", 0) or 0
    if t.gradient_checkpointing:
        # each layer keeps only its input; one layer's activations are rebuilt at a time
        act = n_layers * tokens_micro * hidden * 4.0 + layer_act * (1 + TRANSIENT_LAYERS)
    else:
        act = layer_act * (n_layers + TRANSIENT_LAYERS)
    act += outside
    data = n_tokens * DATA_BYTES_PER_TOKEN
    parts = {
        "baseline": baseline,
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": act,
        "reused buffers": buffers,
        "data": data,
    }
    # Backward frees each layer's activations as it fills that layer's gradients, so both never
    # peak together: at its start the head's (and tied embeddings') gradients sit beside all the
    # activations, at its end every gradient and none of them. The loss computes a trained head's
    # gradient in its forward (in the compute dtype, then fp32) and holds it until backward adds it
    # in. A step of several forwards (a split micro-batch, grad_accum) runs the later ones beside
    # every gradient (full, 2 rows of 256 a step, one a forward: 0.82 GiB above the step's start)
    head_grad = outside_trainable * (6.0 if precision == "bf16" else 4.0)
    together = max(act + head_grad, grads)
    if b > rows_pf or t.grad_accum > 1:
        together = act + grads + head_grad
    parts["backward overlap"] = together - act - grads
    # qlora over an fp32 base: the fp32 weights file is memory-mapped, every page of it is read
    # once to quantize, and the weights that stay fp32 (embeddings, norms) keep the mapping, so
    # those pages stay resident (measured on SmolLM2: qlora's peak RSS above lora's)
    stored, _ = at_depth(lo["stored"], hi["stored"])
    if method == "qlora" and frozen_dtype != "bf16":
        parts["fp32 file pages"] = stored * 4.0
    elif method != "full":
        # loading reads every page of the file; from a wider file it makes a bf16 copy meanwhile, so
        # at the end of loading both are resident (SmolLM2's fp32 file: 0.50 + 0.26 GiB) before
        # qlora quantizes the copy; a file of the load dtype is mapped as it is (its pages are the
        # weights) until LoRA groups stack their weights and copy the rest out of the mapping
        # (`kernels.groups.leave_the_file`): then the file's pages and the copies are resident at once
        file_bytes, dtypes = _cache.get("file") or _cache.setdefault("file", _weights_file(cfg.model.name))
        if frozen_dtype == "bf16":
            loading = file_bytes + (total * 2.0 if dtypes - {"BF16"} else 0.0)
        else:
            loading = file_bytes + (weights if dtypes - {"F32"} or lo["copied_out"] else 0.0)
        over = loading - weights - optimizer - together - buffers
        if over > 0:
            parts["loading (before step 1)"] = over
    peak = sum(parts.values())

    step_s = None
    if probe:

        def secs(r, length):  # per token from the longest probe rows (sdpa: attention is cheap)
            return r["seconds"][lens[-1]] * length / lens[-1]

        micro, per_layer = at_depth(secs(lo, mean_len), secs(hi, mean_len))
        if per_layer <= 0:  # timing noise (a busy machine) swamped the difference: all in the layers
            per_layer = secs(hi, mean_len) / l2
            micro = per_layer * n_layers
        if t.gradient_checkpointing:  # every layer's forward (about a third of its time) runs twice
            micro += n_layers * per_layer / 3
        opt_s = at_depth(lo["opt_s"] or 0.0, hi["opt_s"] or 0.0)[0]
        step_s = max(micro, 0.0) * t.grad_accum + max(opt_s, 0.0)

    final = total * 4.0 if method == "full" else trainable * 4.0
    checkpoint = trainable * 4.0 * 3  # trainable weights + AdamW's two moments
    disk = t.keep_last * checkpoint + final + 20e6  # tokenizer, configs, metrics, plot
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return Estimate(
        peak_bytes=peak,
        parts=parts,
        step_s=step_s,
        disk_bytes=disk,
        ram_budget=ram_budget(ram_gib),
        disk_free=disk_free(Path(t.output_dir)),
        processes=processes,
        params=int(round(total)),
        trainable=int(round(trainable)),
        tokens_per_step=int(b * mean_len * t.grad_accum),
        notes=[] if not tied else ["tied embeddings"],
        warnings=_warnings(cfg, probe),
    )
