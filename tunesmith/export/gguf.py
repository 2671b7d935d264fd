"""Write a model (or a LoRA/DoRA run, merged in memory) as a GGUF file for llama.cpp and Ollama.

Contract:
- `export_gguf(model_spec, out_path=None, quant="f16", force=False) -> Path` takes a run dir
  (adapter folded in first), a full model dir, or anything `models.resolve_model` accepts, and
  writes one GGUF with the `gguf` package: architecture hparams, every weight under llama.cpp's
  tensor names, the byte-level BPE tokenizer (tokens, types, merges, special ids, pre-tokenizer
  name), the chat template, and EOS set to the chat's end-of-turn token so llama.cpp stops.
  Architectures: llama (SmolLM2 is one), mistral (written as llama, as llama.cpp does), qwen2,
  qwen3, gemma2, gemma3 (text-only `Gemma3ForCausalLM`) and phi3; what differs between them
  (tensor names, Gemma's (1 + w) norms, hparams, refused configs) is in `gguf_families.py`.
  Quant types: f32, f16, q8_0, q4_0. 1-D tensors (norms, biases) stay f32; a matrix whose rows
  are not a whole number of quant blocks falls back to f16. Tied embeddings are written once,
  as `token_embd.weight` (llama.cpp reuses it as the output head when `output.weight` is absent).
  The file is written under a temporary name and renamed; an existing file is refused unless
  `force`. Default path: `<run>/export/model-<quant>.gguf` for run dirs, else `./<name>-<quant>.gguf`.
- q4_k_m, q5_k_m and q6_k are made by llama.cpp's quantizer from an f32 file written here (`kquant.py`).
- Beside it, an Ollama `Modelfile` (`FROM`, a Go `TEMPLATE` derived by rendering the chat template,
  `PARAMETER stop` lines, and `SYSTEM` when the run has `data.system_prompt`). If a `Modelfile`
  for another GGUF is already there, this one is written as `<name>.Modelfile` instead.
- Bad input (corrupt safetensors or GGUF, unknown architecture or tokenizer) raises a one-line
  `UserError`; `tunesmith export` (`commands.export`) is the CLI over it.
"""

from __future__ import annotations

import json
import os
import re
from hashlib import sha256
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from tunesmith.config import GGUF_QUANTS
from tunesmith.errors import UserError
from tunesmith.export.gguf_families import ARCHITECTURES, UNSUPPORTED, check, check_dir, family, write_hparams
from tunesmith.export.merge import load_merged
from tunesmith.io import check_not_input, replacing, write_atomic
from tunesmith.models import BUNDLED
from tunesmith.rundir import RunDir

QUANTS = ("f32", "f16", "q8_0", "q4_0")
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
}
BLOCK_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# llama.cpp names a BPE pre-tokenizer by hashing the ids of this text (convert_hf_to_gguf.py,
# get_vocab_base_pre); the string and the hashes must match theirs byte for byte.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits digits one by one
PRE_TOKENIZER_SHAPES = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
# Tokens that end a turn in common chat formats; any present in the vocab becomes a stop.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp's name for an HF parameter of `arch`; None for one it has no name for."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    module, kind = ".".join(parts[3:-1]), parts[-1]
    table = {**LAYER_TENSORS, **family(arch).layer_tensors}
    if module not in table or kind not in ("weight", "bias"):
        return None
    return f"blk.{parts[2]}.{table[module]}.{kind}"


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → GGML row order of a q/k projection (weight or bias) for llama.cpp's Llama graph.

    HF's rotary embedding rotates dim i with dim i + d/2 inside each head ("rotate_half");
    llama.cpp's normal RoPE rotates adjacent pairs (2i, 2i+1). Interleaving the two halves of
    every head makes the same rotation happen. transformers' GGUF loader undoes exactly this.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(data: np.ndarray, quant: str):
    """`(array, raw_dtype)` for GGUFWriter.add_tensor: norms/biases f32, matrices in `quant`."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim < 2 or quant == "f32":
        return data, None
    if quant == "f16":
        return data.astype(np.float16), None
    qtype = BLOCK_TYPES[quant]
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        # A row that is not a whole number of blocks cannot be quantized; f16 is the next best.
        return data.astype(np.float16), None
    return quantize(data, qtype), qtype


def _pre_tokenizer_shape(tokenizer) -> tuple:
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    detail = {
        "Split": lambda s: (s.get("pattern") or {}).get("Regex"),
        "ByteLevel": lambda s: s.get("use_regex", True),
        "Digits": lambda s: s.get("individual_digits", False),
    }
    return tuple((s.get("type"), detail.get(s.get("type"), lambda _: None)(s)) for s in steps)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer: by hash, else by its structure."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    # A vocabulary trained by a user (or a test) has no published hash, but its splitting rule
    # is still one llama.cpp implements when the pre-tokenizer has one of these shapes.
    shape = _pre_tokenizer_shape(tokenizer)
    if shape in PRE_TOKENIZER_SHAPES:
        return PRE_TOKENIZER_SHAPES[shape]
    raise UserError(
        f"tokenizer: its pre-tokenizer is not one llama.cpp knows (hash {digest[:16]}…); known: "
        f"{', '.join(sorted(set(PRE_TOKENIZER_HASHES.values())))}"
    )


# ------------------------------------------------------------------ chat template → Ollama


def _go_text(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer) -> tuple[str | None, str | None]:
    """A Go template equal to the chat template for one system + user turn, and the end-of-turn text.

    Rendered with marker strings in place of the system prompt, the user message and the reply;
    the text around the markers becomes the template. None when the template does not have that
    shape (then Ollama falls back to its own detection).
    """
    s, u, r = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01REPLY\x01"
    system, user, reply = ({"role": role, "content": c} for role, c in (("system", s), ("user", u), ("assistant", r)))
    try:
        with_sys = tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
        no_sys = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template([user, reply], tokenize=False)
    except Exception:  # noqa: BLE001 — a template may raise anything (jinja, its own raise_exception)
        return None, None
    if with_sys.count(s) != 1 or with_sys.count(u) != 1 or with_sys.index(s) > with_sys.index(u):
        return None, None
    before_sys, rest = with_sys.split(s)
    after_sys, header = rest.split(u)
    if no_sys.count(u) != 1 or not no_sys.endswith(u + header):
        return None, None
    default = no_sys[: no_sys.index(u)]
    end = ""
    if turn.count(r) == 1 and turn.split(u)[-1].startswith(header):
        end = turn.split(r)[1]
    # Text shared by both branches (e.g. the user header) goes after the {{ end }}.
    common = os.path.commonprefix([after_sys[::-1], default[::-1]])[::-1]
    after_sys, default = after_sys[: len(after_sys) - len(common)], default[: len(default) - len(common)]
    template = "{{ if .System }}" + _go_text(before_sys) + "{{ .System }}" + _go_text(after_sys)
    template += ("{{ else }}" + _go_text(default) if default else "") + "{{ end }}"
    template += _go_text(common) + "{{ .Prompt }}" + _go_text(header) + "{{ .Response }}" + _go_text(end)
    return template, end


def end_of_turn_id(tokenizer, end: str | None) -> int | None:
    """The id of the special token that closes an assistant turn (`<|im_end|>` for ChatML)."""
    text = (end or "").strip()
    if text and text in tokenizer.get_vocab() and len(tokenizer.encode(text, add_special_tokens=False)) == 1:
        return tokenizer.convert_tokens_to_ids(text)
    return tokenizer.eos_token_id


def modelfile_path(gguf_path: Path) -> Path:
    """`Modelfile` beside the GGUF, unless that one belongs to another export (then `<name>.Modelfile`)."""
    path = gguf_path.parent / "Modelfile"
    if path.is_file() and path.read_text(encoding="utf-8").splitlines()[:1] != [f"FROM ./{gguf_path.name}"]:
        return gguf_path.with_suffix(".Modelfile")
    return path


def modelfile_value(text: str, triple: bool = False) -> str:
    """`text` as one Modelfile argument that no content can end early. Ollama's parser has no
    escapes: a value ends at a line break once the text so far (spaces trimmed) is a whole quoted
    string. So a one-line value is `"text"` (unless `triple`, or it starts with a quote, which
    would open a triple quote), and anything else is `\"\"\"text\"\"\"` with every line that would close it (ending
    in three quotes, spaces aside) given a space before its last quote: the one change made."""
    if not triple and not re.search(r"[\r\n]", text) and not text.startswith('"'):
        return f'"{text}"'
    lines = re.split(r"(\r\n|\r|\n)", text)
    for i in range(0, len(lines) - 1, 2):  # every line followed by a break
        body = lines[i].rstrip(" \t")
        if body.endswith('"""'):
            lines[i] = body[:-1] + ' "' + lines[i][len(body) :]
    return '"""' + "".join(lines) + '"""'


def write_modelfile(gguf_path: Path, tokenizer, template, eot_id, system: str | None) -> Path:
    path = modelfile_path(gguf_path)
    name = f"./{gguf_path.name}"
    plain = re.fullmatch(r'[^\s"]+', name)
    lines = ["FROM " + (name if plain else modelfile_value(name))]
    if template:
        lines.append(f"TEMPLATE {modelfile_value(template, triple=True)}")
    if system:
        lines.append(f"SYSTEM {modelfile_value(system, triple=True)}")
    vocab = tokenizer.get_vocab()
    stops = [tokenizer.convert_ids_to_tokens(eot_id)] if eot_id is not None else []
    stops += [t for t in END_OF_TURN if t in vocab]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {modelfile_value(stop)}")
    return write_atomic(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------ the GGUF itself


def _vocab(tokenizer, vocab_size: int):
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise UserError("tokenizer: only fast (tokenizer.json) tokenizers can be exported to GGUF")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if spec["model"].get("type") != "BPE" or not byte_level:
        raise UserError(
            "tokenizer: only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2) can be "
            f"exported to GGUF yet; this one is {spec['model'].get('type')} without ByteLevel"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"tokenizer: has ids up to {max(by_id)} but the model's embedding has only {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def _write_tokenizer(writer, tokenizer, vocab_size: int, eot_id: int | None) -> None:
    tokens, types, merges = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if eot_id is not None:
        writer.add_eos_token_id(eot_id)
        writer.add_eot_token_id(eot_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # llama.cpp adds BOS unless told otherwise; match what the HF tokenizer does.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_tensors(writer, model, arch: str, quant: str) -> None:
    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    fam = family(arch)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = gguf_tensor_name(hf_name, arch)
        if name is None:
            raise UserError(f"model: tensor {hf_name} has no GGUF equivalent for {config.model_type}; cannot export it")
        data = tensor.detach().float().cpu().numpy()
        if fam.permute_rotary and ".attn_q." in name:
            data = permute_rotary(data, n_head)
        elif fam.permute_rotary and ".attn_k." in name:
            data = permute_rotary(data, n_kv)
        elif fam.norm_shift and hf_name.endswith("norm.weight"):
            data = data + fam.norm_shift
        array, raw_dtype = encode_tensor(data, head_quant(name, quant, tied))
        writer.add_tensor(name, array, raw_dtype=raw_dtype)


def head_quant(name: str, quant: str, tied: bool) -> str:
    """The output head (or the tied embedding that serves as it) stays at q8_0 in 4-bit files:
    its errors land straight on the logits, and llama.cpp's own quantizer also keeps it wider."""
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    return "q8_0" if quant == "q4_0" and is_head else quant


def _model_type(spec: str) -> str | None:
    """The model_type from config.json when it is at hand, so unsupported models (and configs of a
    supported family that llama.cpp would run differently) fail before loading."""
    path = Path(spec).expanduser()
    if RunDir(path).kind == "adapter":
        path = Path(RunDir(path).base_model()).expanduser()
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
    if model_type in ARCHITECTURES:
        check_dir(path, spec)
    return model_type


def _check_architecture(model_type: str | None, spec: str) -> None:
    if model_type is not None and model_type not in ARCHITECTURES:
        raise UserError(
            f"{spec}: architecture {model_type} cannot be exported to GGUF yet{UNSUPPORTED.get(model_type, '')}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )


def default_export_path(spec: str, quant: str) -> Path:
    path = Path(spec).expanduser()
    if RunDir(path).is_run:
        return RunDir(path).export_dir / f"model-{quant}.gguf"
    if spec in BUNDLED:
        name = spec
    elif path.suffix.lower() == ".gguf":
        name = path.stem
    else:
        name = path.resolve().name if path.is_dir() else spec.rstrip("/").split("/")[-1]
    return Path(f"{name}-{quant}.gguf")


def export_gguf(model_spec: str, out_path=None, quant: str = "f16", force: bool = False) -> Path:
    if quant not in GGUF_QUANTS:
        raise UserError(f"expected one of {', '.join(GGUF_QUANTS)}, got {quant}", key="quant")
    if quant not in QUANTS:  # a K-quant: llama.cpp's quantizer over an f32 file written here
        from tunesmith.export.kquant import export_kquant

        return export_kquant(model_spec, out_path, quant, force)
    out = Path(out_path).expanduser() if out_path else default_export_path(model_spec, quant)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"{out} must end in .gguf", key="out_path")
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a file path ending in .gguf", key="out_path")
    check_not_input(out, [model_spec], key="out_path")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass force=True to replace it", key="out_path")
    _check_architecture(_model_type(model_spec), model_spec)
    with replacing(out, key="out_path"):  # a second writer is refused; killed writes' leftovers go
        return _export(model_spec, out, quant)


def _export(model_spec: str, out: Path, quant: str) -> Path:

    from tunesmith.data.sft import ensure_chat_template

    model, tokenizer = load_merged(model_spec)
    config = model.config
    _check_architecture(config.model_type, model_spec)
    arch = ARCHITECTURES[config.model_type]
    check(config, arch, model_spec)
    ensure_chat_template(tokenizer)  # the same ChatML fallback training and chat use
    template, end = ollama_template(tokenizer)
    eot_id = end_of_turn_id(tokenizer, end)

    out.parent.mkdir(parents=True, exist_ok=True)

    def fill(writer) -> None:
        writer.add_type("model")
        writer.add_name(out.stem)
        writer.add_file_type(FILE_TYPES[quant])
        if quant in BLOCK_TYPES:
            writer.add_quantization_version(GGML_QUANT_VERSION)
        write_hparams(writer, config, arch)
        _write_tokenizer(writer, tokenizer, config.vocab_size, eot_id)
        _write_tensors(writer, model, arch, quant)

    write_gguf(out, arch, fill)
    write_modelfile(out, tokenizer, template, eot_id, RunDir(model_spec).system_prompt)
    return out


def write_gguf(out: Path, arch: str, fill) -> None:
    """A GGUF whose metadata and tensors `fill(writer)` adds, written under a temporary name,
    synced and renamed into place (a killed write leaves no half file)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
