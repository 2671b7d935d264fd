"""Load a model for generation: a base model name, a full fine-tune, or a run dir's base + adapter.

Contract: `load_for_inference(spec, device=None, dtype=None, trust_remote_code=False)` returns
`(model, tokenizer, label)` in eval mode. An adapter run (`RunDir.kind == "adapter"`) loads its
base (`RunDir.base_model`) and the adapter on top, with the run's own tokenizer when it saved one;
a run dir with no finished model is a one-line `UserError`, as is an unreadable adapter. Adapters
load only from `adapter_model.safetensors`: a pickled `adapter_model.bin` is refused, naming the
file and how to convert it.
"""

from __future__ import annotations

from tunesmith.errors import UserError
from tunesmith.models import check_safetensors, load_model, load_tokenizer, resolve_model
from tunesmith.rundir import ADAPTER_WEIGHTS, RunDir

CONVERT = (
    'python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
)


def check_adapter_file(path) -> None:
    """Adapters load only from adapter_model.safetensors: a pickled one is refused by name."""
    if (path / ADAPTER_WEIGHTS).is_file():
        return
    pickled = [path / name for name in ("adapter_model.bin", "adapter_model.pt") if (path / name).is_file()]
    if pickled:
        raise UserError(
            f"{pickled[0]}: a pickled adapter (it could run code when loaded); tunesmith loads adapters only from "
            f"{ADAPTER_WEIGHTS}; convert it once, in that folder, if you trust it: {CONVERT}"
        )
    raise UserError(f"{path}: no {ADAPTER_WEIGHTS}; this adapter run has not finished (resume it) or is incomplete")


def load_for_inference(spec: str, device=None, dtype=None, trust_remote_code: bool = False):
    run = RunDir(spec)
    path = run.path
    if run.kind == "adapter":
        from peft import PeftModel
        from safetensors import SafetensorError

        check_adapter_file(path)
        check_safetensors(path)
        base_name = run.base_model()
        base = load_model(resolve_model(base_name), dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            model = PeftModel.from_pretrained(base, str(path))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise UserError(f"{path}: cannot load the adapter ({str(err).splitlines()[0]})") from None
        own_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(path) if own_tokenizer else resolve_model(base_name))
        label = f"{base_name} + adapter {path}"
    elif path.is_dir() and run.has_config and run.kind is None:
        raise UserError(
            f"{path}: this run dir has no finished model yet (no adapter or weights); finish or resume training"
        )
    else:
        resolved = resolve_model(spec)
        model = load_model(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        label = spec
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, label
