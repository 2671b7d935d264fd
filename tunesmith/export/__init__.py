"""Getting a tuned model out: merge an adapter into its base, write GGUF for llama.cpp / Ollama.

`merge_run(run_dir, out_dir)` → an HF safetensors dir (see `merge.py`);
`export_gguf(model_spec, out_path, quant)` → a `.gguf` file plus an Ollama `Modelfile` (see `gguf.py`),
checked in llama.cpp by `verify.py`; `quantize.py` → int8/int4 weight-only models for PyTorch.
Both are imported lazily so `import tunesmith.export` stays cheap.
"""


def merge_run(run_dir, out_dir=None, force: bool = False):
    from tunesmith.export.merge import merge_run as _merge_run

    return _merge_run(run_dir, out_dir, force=force)


def export_gguf(model_spec, out_path=None, quant: str = "f16", force: bool = False):
    from tunesmith.export.gguf import export_gguf as _export_gguf

    return _export_gguf(model_spec, out_path, quant=quant, force=force)
