"""A byte-level BPE tokenizer trained on the pre-training corpus.

Contract: `train_tokenizer(texts, vocab_size)` trains on an iterator of strings (streamed: the
`tokenizers` trainer keeps word counts, not the text) and returns a `PreTrainedTokenizerFast`
with the special tokens `<|endoftext|>` (pad, and the separator between documents),
`<|im_start|>` (bos) and `<|im_end|>` (eos) and a ChatML chat template, so the model it
belongs to can be fine-tuned on conversations and exported to GGUF like SmolLM2. Byte-level
means every string is encodable (no unknown token) and decoding gives the bytes back exactly,
which is what bits-per-byte needs. Training is deterministic for a given corpus and size.
`cached_tokenizer(...)` keeps the result under the data cache, keyed by the corpus hash.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.data.sft import CHATML

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL[0], bos_token=SPECIAL[1], eos_token=SPECIAL[2]
    )
    fast.chat_template = CHATML
    return fast


def cached_tokenizer(cache_dir: Path, corpus_key: str, vocab_size: int, texts_factory):
    """Train once per (corpus, vocab size); later runs read `tokenizer-<key>.json`."""
    from tokenizers import Tokenizer

    path = Path(cache_dir) / f"tokenizer-{corpus_key}-{vocab_size}.json"
    if path.is_file():
        return wrap(Tokenizer.from_file(str(path)))
    fast = train_tokenizer(texts_factory(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    fast.backend_tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return fast
