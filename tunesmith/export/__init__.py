"""Getting a tuned model out: merge, GGUF for llama.cpp / Ollama, int8/int4 for PyTorch.

`merge.merge_run(run_dir, out_dir)` → an HF safetensors dir with the adapter folded in;
`gguf.export_gguf(model_spec, out_path, quant)` → a `.gguf` file plus an Ollama `Modelfile`,
checked in llama.cpp by `verify`; `kquant` → K-quant GGUFs made by llama.cpp's quantizer, weighted by
`imatrix` (an importance matrix tunesmith measures on a calibration text);
`lora_gguf.export_adapter(run_dir)` → a LoRA alone as a llama.cpp GGUF LoRA beside a base GGUF;
`quantize` → weight-only int8/int4 models for PyTorch.
"""
