"""tunesmith: adapt a pre-trained causal LM to a task or domain on the hardware you have.

Library entry points are imported lazily so `import tunesmith` stays cheap (no torch):
`tunesmith.train(cfg)` runs a fine-tune and returns its result (output dir, model).
"""

__version__ = "0.1.0"


def train(cfg):
    """Fine-tune per `cfg` (a `tunesmith.config.Config`); returns a `TrainResult`."""
    from tunesmith.train.loop import run_training

    return run_training(cfg)
