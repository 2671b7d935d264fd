"""Pre-training on raw text: tokenizer training, from-scratch model presets, cached token streams."""
