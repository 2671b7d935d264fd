"""Pre-training pieces: presets, the byte-level tokenizer, the cached token stream, blocks, bad input."""

import json
import math

import numpy as np
import pytest

from tunesmith.config import PretrainConfig, load_config
from tunesmith.errors import UserError
from tunesmith.pretrain import textdata
from tunesmith.pretrain.presets import PRESETS, count_params, model_config
from tunesmith.pretrain.tokenizer import train_tokenizer

TEXT = "The lamplighter rowed around the harbour.\nThe baker fed the gull on Quay Street.\n" * 20


def test_presets_have_their_advertised_sizes(tiny_tokenizer):
    expected = {"tiny": (0.8e6, 1.6e6), "small": (8e6, 12e6), "base": (40e6, 60e6)}
    for name in PRESETS:
        n = count_params(model_config(PretrainConfig(preset=name), 4096, tiny_tokenizer, 512))
        lo, hi = expected[name]
        assert lo <= n <= hi, (name, n)


def test_explicit_dimensions_override_the_preset_and_count_exactly(tiny_tokenizer):
    from transformers import LlamaForCausalLM

    p = PretrainConfig(preset="base", hidden_size=32, layers=2, heads=4, intermediate_size=48)
    config = model_config(p, 300, tiny_tokenizer, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert count_params(config) == sum(t.numel() for t in LlamaForCausalLM(config).parameters())


def test_tokenizer_is_byte_level_and_lossless():
    tok = train_tokenizer([TEXT], 300)
    assert len(tok) <= 300 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for s in ("Quay Street, 1874 — naïve café ☕\n", "\x01odd bytes\t"):
        assert tok.decode(tok(s)["input_ids"]) == s
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")


def test_token_stream_is_cached_and_keyed_by_content(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.jsonl").write_text(json.dumps({"text": "one record"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (corpus / "skip.bin").write_bytes(b"\0\1")  # not a text suffix: a folder ignores it
    files = textdata.corpus_files([str(corpus)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    tok = train_tokenizer(textdata.texts(files), 300)
    tokens, meta = textdata.token_stream(files, tok, tmp_path / "cache")
    assert not meta["from_cache"] and meta["n_docs"] == 3
    assert meta["n_bytes"] == len(TEXT.encode()) + len("one record") + len("two")
    assert tok.decode(tokens[: meta["n_tokens"]].tolist()).startswith(TEXT)
    assert int((np.asarray(tokens) == tok.eos_token_id).sum()) == 3
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    assert meta["unigram_bits_per_token"] == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-3)
    again, meta2 = textdata.token_stream(files, tok, tmp_path / "cache")
    assert meta2["from_cache"] and (np.asarray(again) == np.asarray(tokens)).all()
    (corpus / "a.txt").write_text(TEXT + "more\n")
    _, meta3 = textdata.token_stream(files, tok, tmp_path / "cache")
    assert not meta3["from_cache"]


def test_text_is_streamed_in_pieces_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(textdata, "PIECE", 64)
    f = tmp_path / "a.txt"
    f.write_text("é" * 50 + "\n" + "word " * 40 + "\nlast line without newline")
    got = list(textdata.pieces([f]))
    assert "".join(t for t, _ in got) == f.read_text()
    assert [end for _, end in got] == [False] * (len(got) - 1) + [True] and len(got) > 2


def test_blocks_split_evenly_and_rows_read_the_memmap():
    train, val = textdata.split_blocks(1000, 10, 0.1)
    assert len(train) + len(val) == 100 and not set(train) & set(val)
    assert list(val[:3]) == [9, 19, 29]
    tokens = np.arange(1000, dtype=np.uint16)
    rows = textdata.BlockRows(tokens, 10, val)
    assert rows[0].input_ids == list(range(90, 100)) and rows[0].labels == rows[0].input_ids
    assert rows[0].position_ids == list(range(10)) and len(rows[:2]) == 2 and len(rows) == 10
    assert textdata.bits_per_byte(math.log(2), {"n_tokens": 10, "n_bytes": 40}) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "corpus is empty"),
        (b"\n\n", "corpus is empty"),
        (b"text\0with a NUL", "looks binary (a NUL byte at byte 4)"),
        (b"caf\xe9 latin-1", "looks binary (invalid UTF-8 at byte 3)"),
    ],
)
def test_bad_corpus_files_are_one_line_errors(tmp_path, tiny_tokenizer, content, needle):
    f = tmp_path / "a.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match="^" + str(f).replace(".", r"\.") + "|pretrain.corpus") as err:
        textdata.token_stream([f], tiny_tokenizer, tmp_path / "cache")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*.bin")), "no half-written cache"


def test_bad_corpus_paths_and_jsonl(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="no corpus given"):
        textdata.corpus_files([])
    with pytest.raises(UserError, match="not found"):
        textdata.corpus_files([str(tmp_path / "nope")])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(UserError, match=r"expected a \.txt, \.md or \.jsonl file"):
        textdata.corpus_files([str(tmp_path / "x.pdf")])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"b\.jsonl:2: expected an object with a \"text\" string"):
        textdata.token_stream([bad], tiny_tokenizer, tmp_path / "cache")
    with pytest.raises(UserError, match="fewer than 2 blocks"):
        textdata.split_blocks(100, 64, 0.1)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("pretrain.preset=huge", "pretrain.preset"),
        ("pretrain.vocab_size=100", "pretrain.vocab_size"),
        ("pretrain.val_fraction=0", "pretrain.val_fraction"),
        ("pretrain.hidden_size=30", "pretrain.heads"),
        ("pipeline.stages=[finetune,deploy]", "pipeline.stages"),
        ("pipeline.export_quants=[q2_k]", "pipeline.export_quants"),
    ],
)
def test_bad_pretrain_and_pipeline_keys(override, needle):
    extra = ["pretrain.heads=4"] if "hidden_size" in override else []
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config(None, [override, *extra])
