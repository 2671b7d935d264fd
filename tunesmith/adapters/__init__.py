"""Adapters and the storage of frozen weights.

`methods` applies a fine-tuning method (full, LoRA, DoRA, QLoRA) to a loaded model through PEFT;
`fused_lora` is PEFT's LoRA layer with a one-node forward/backward; `storage` keeps frozen weights
compact (NF4, int4, bf16) and dequantizes per matmul; `weights` hands a matmul the weight it
computes with, whatever storage holds it.
"""
