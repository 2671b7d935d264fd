"""Workflows: compositions of the stages, each a library function first.

`quickstart` (LoRA-tune the bundled SmolLM2, before/after, then compare), `pipeline` (pretrain →
fine-tune → merge → export → compare, resumable) and `compare` (train the run a config describes
when it is not there yet, then compare it).
"""
