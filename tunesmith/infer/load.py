"""Load a model for generation: a base model name, a full fine-tune, or a run dir's base + adapter.

Contract: `load_for_inference(spec, device=None, dtype=None, trust_remote_code=False)` returns
`(model, tokenizer, label)` in eval mode. An adapter run (`RunDir.kind == "adapter"`) loads its
base (`RunDir.base_model`) and the adapter on top, with the run's own tokenizer when it saved one;
a run dir with no finished model is a one-line `UserError`, as is an unreadable adapter.
"""

from __future__ import annotations

from tunesmith.errors import UserError
from tunesmith.models import check_safetensors, load_model, load_tokenizer, resolve_model
from tunesmith.rundir import RunDir


def load_for_inference(spec: str, device=None, dtype=None, trust_remote_code: bool = False):
    run = RunDir(spec)
    path = run.path
    if run.kind == "adapter":
        from peft import PeftModel
        from safetensors import SafetensorError

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
