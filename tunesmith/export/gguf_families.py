"""What differs between model families on the way to GGUF: architecture name, tensor names, hparams, checks.

Contract:
- `ARCHITECTURES` maps an HF `model_type` to llama.cpp's architecture name; `FAMILIES` holds one
  `GgufFamily` per architecture. `family(arch)` returns it.
- `GgufFamily.layer_tensors` names HF layer modules whose llama.cpp name differs from Llama's table
  (`gguf.LAYER_TENSORS`): Gemma's four norms per layer, the q/k norms of Qwen3 and Gemma 3, Phi-3's
  fused `qkv_proj` (→ `attn_qkv`) and `gate_up_proj` (→ `ffn_up`, gate half first, as llama.cpp's
  SwiGLU splits it).
- `norm_shift`: Gemma's RMSNorm scales by (1 + w); llama.cpp multiplies by the stored weight, so
  every `*norm.weight` is written as w + 1 (as llama.cpp's converter does).
- `write_hparams(writer, config, arch)` writes the shared hparams and each family's own: key/value
  length, Gemma's attention and final-logit soft-capping, the sliding window and its layer pattern,
  Gemma 3's RoPE base for local layers and linear scaling of global ones, Phi-3's rotary dims.
- `check(config, arch, spec)` (and `check_dir(path, spec)`, before the weights load) raises a
  one-line `UserError` for a config llama.cpp would run differently from transformers (an untied
  Gemma 2 head, a query scale or layer pattern llama.cpp does not use, scaled RoPE other than
  Gemma 3's linear), so nothing is written for it.
The embedding scale (√hidden) of Gemma is applied by llama.cpp's graph itself; nothing to write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tunesmith.errors import UserError

# HF model_type → GGUF architecture. llama.cpp converts Mistral with the Llama graph.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
# Near misses, named in the refusal.
UNSUPPORTED = {
    "gemma3": " (multimodal Gemma3ForConditionalGeneration; its text-only Gemma3ForCausalLM, gemma3_text, is)"
}
QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


@dataclass(frozen=True)
class GgufFamily:
    layer_tensors: dict = field(default_factory=dict)  # HF module → llama.cpp name, beyond Llama's
    permute_rotary: bool = False  # llama.cpp's Llama graph rotates adjacent pairs (see gguf.permute_rotary)
    norm_shift: float = 0.0  # added to every RMSNorm weight
    untied_head: bool = True  # llama.cpp's graph can load a separate output.weight


FAMILIES = {
    "llama": GgufFamily(permute_rotary=True),
    "qwen2": GgufFamily(),
    "qwen3": GgufFamily(layer_tensors=QK_NORM),
    "gemma2": GgufFamily(layer_tensors=GEMMA_NORMS, norm_shift=1.0, untied_head=False),
    "gemma3": GgufFamily(layer_tensors={**GEMMA_NORMS, **QK_NORM}, norm_shift=1.0),
    "phi3": GgufFamily(layer_tensors={"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}),
}


def family(arch: str) -> GgufFamily:
    return FAMILIES[arch]


def _rope(config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters (rope_type, rope_theta, factor…) of one layer type, across config styles."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):  # Gemma 3: one entry per layer type
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    return {**scaling, **params, "rope_type": kind, "rope_theta": float(theta)}


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gemma_scale_check(config, spec: str) -> None:
    """llama.cpp scales queries by 1/√head_dim (1/√(hidden/heads) for the 27B shapes), not by
    transformers' `query_pre_attn_scalar`; both must agree."""
    big = config.num_hidden_layers == (46 if config.model_type == "gemma2" else 62)
    expected = config.hidden_size // config.num_attention_heads if big else _head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", None) or expected
    if not math.isclose(float(scalar), float(expected)):
        raise UserError(
            f"{spec}: query_pre_attn_scalar {scalar} is not the {expected} llama.cpp scales queries by; "
            "cannot export it to GGUF"
        )


def check(config, arch: str, spec: str) -> None:
    """Refuse, in one line, a config this exporter would write but llama.cpp would run differently."""
    fam = FAMILIES[arch]
    head = getattr(config, "tie_word_embeddings", True)
    if not fam.untied_head and not head:
        raise UserError(f"{spec}: llama.cpp's {arch} graph has no separate output head; only tied heads export")
    full = _rope(config)
    allowed = ("default", "linear") if arch == "gemma3" else ("default",)
    if full["rope_type"] not in allowed:
        raise UserError(
            f"{spec}: RoPE scaling {full['rope_type']!r} cannot be exported to GGUF yet (only unscaled RoPE)"
        )
    if arch not in ("gemma2", "gemma3"):
        return
    _gemma_scale_check(config, spec)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{spec}: activation {act} is not the tanh GELU llama.cpp's {arch} graph uses")
    if arch == "gemma2" and not getattr(config, "attn_logit_softcapping", None):
        raise UserError(f"{spec}: gemma2 without attention soft-capping cannot be exported (llama.cpp always caps)")
    if arch == "gemma3" and getattr(config, "attn_logit_softcapping", None):
        raise UserError(f"{spec}: gemma3 with attention soft-capping cannot be exported (llama.cpp has none)")
    if arch == "gemma3" and _rope(config, "sliding_attention")["rope_type"] != "default":
        raise UserError(f"{spec}: scaled RoPE on gemma3's sliding-window layers cannot be exported to GGUF")
    if arch == "gemma2":
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
        if _layer_types(config) != expected:
            raise UserError(
                f"{spec}: gemma2 layer_types must alternate sliding/full attention (llama.cpp's fixed pattern)"
            )


def check_dir(path, spec: str) -> None:
    """`check` on a model dir's config.json, before its weights are loaded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError):
        return  # loading the model reports it
    check(config, ARCHITECTURES[config.model_type], spec)


def write_hparams(writer, config, arch: str) -> None:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "phi3":  # partial rotary (Phi-4-mini rotates 3/4 of each head)
        factor = _rope(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        writer.add_rope_dimension_count(int(head_dim * factor))
    if head_dim * n_head != config.hidden_size or arch in ("gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        _write_gemma(writer, config, arch)
    elif arch == "phi3" and getattr(config, "sliding_window", None):
        # Written as llama.cpp's converter does; llama.cpp runs Phi-3 with full attention.
        writer.add_sliding_window(config.sliding_window)


def _write_gemma(writer, config, arch: str) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    types = _layer_types(config)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
        return
    if "sliding_attention" in types:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        writer.add_rope_freq_base_swa(_rope(config, "sliding_attention")["rope_theta"])
    full = _rope(config)
    if full["rope_type"] == "linear":  # Gemma 3 4B+: global layers only
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
