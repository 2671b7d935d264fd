"""Data: files → examples (formats) → token samples (sft) → rows (packing). Never imports a model."""
