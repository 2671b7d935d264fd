"""Inference: load what training produced, and batched generation with a KV cache.

`load.load_for_inference(spec)` loads a base model, a full fine-tune or base + adapter;
`generate` answers conversations (batched, greedy or sampled, streamed for chat). Used by
chat/generate, compare, the quickstart and export verification.
"""
