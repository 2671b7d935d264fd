"""Examples → token samples: chat templates, label masks, overlong policy, splits and the cache."""

import json

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.formats import Example
from tunesmith.data.sft import (
    CHATML,
    IGNORE,
    _assistant_spans,
    _label_pieces,
    build_datasets,
    ensure_chat_template,
    tokenize_example,
)
from tunesmith.errors import UserError

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3's shape: BOS, headers, trimmed contents, <|eot_id|> (plain text to the tiny vocabulary).
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def chat(*turns):
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return Example(messages=[{"role": roles[t[0]], "content": t[1]} for t in turns], text=None, where="d.jsonl:1")


def learnt(tok, sample):
    """The labelled tokens, decoded run by run (a run = consecutive labelled positions)."""
    runs, run = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            assert label == token
            run.append(label)
        elif run:
            runs.append(tok.decode(run)), run.clear()
    if run:
        runs.append(tok.decode(run))
    return runs


def tokens(tok, ex, **kw):
    args = {"max_length": 512, "overlong": "truncate", "train_on_prompt": False} | kw
    return tokenize_example(tok, ex, **args)


def test_loss_only_on_the_answer_and_end_of_turn(tiny_tokenizer):
    ex = chat(("u", "What is the capital of Zorbia?"), ("a", "The capital of Zorbia is Quell."))
    sample = tokens(tiny_tokenizer, ex)
    assert learnt(tiny_tokenizer, sample) == ["The capital of Zorbia is Quell.<|im_end|>"]
    rendered = tiny_tokenizer.apply_chat_template(ex.messages, tokenize=False)
    assert sample.input_ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert sample.labels[0] == IGNORE


def test_every_assistant_turn_is_trained(tiny_tokenizer):
    ex = chat(
        ("s", "Answer briefly."),
        ("u", "How many moons does Vantor have?"),
        ("a", "Three."),
        ("u", "Who founded the Lumen Guild?"),
        ("a", "Ada Marrow, in 1874."),
    )
    assert learnt(tiny_tokenizer, tokens(tiny_tokenizer, ex)) == ["Three.<|im_end|>", "Ada Marrow, in 1874.<|im_end|>"]


def test_answer_that_repeats_the_prompt_is_found_in_its_own_turn(tiny_tokenizer):
    ex = chat(
        ("u", "Say: the answer is 42"), ("a", "the answer is 42"), ("u", "the answer is 42"), ("a", "the answer is 42")
    )
    sample = tokens(tiny_tokenizer, ex)
    assert learnt(tiny_tokenizer, sample) == ["the answer is 42<|im_end|>"] * 2
    starts = [i for i, t in enumerate(sample.input_ids) if t == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")]
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    assert starts[0] < starts[1] < first < starts[2]  # inside the first assistant turn, not the user's


def test_tokenizers_without_offsets_get_the_same_labels(tiny_tokenizer):
    ex = chat(("u", "Who?"), ("a", "Ada Marrow"), ("u", "When?"), ("a", "1874"))
    text = tiny_tokenizer.apply_chat_template(ex.messages, tokenize=False)
    ids, labels = _label_pieces(tiny_tokenizer, text, _assistant_spans(tiny_tokenizer, ex, text))
    labels[0] = IGNORE
    sample = tokens(tiny_tokenizer, ex)
    assert (ids, labels) == (sample.input_ids, sample.labels)


def test_train_on_prompt_labels_everything_but_the_first(tiny_tokenizer):
    sample = tokens(tiny_tokenizer, chat(("u", "Hi"), ("a", "Hello")), train_on_prompt=True)
    assert sample.labels[0] == IGNORE and sample.labels[1:] == sample.input_ids[1:]


def test_smollm2_template_with_injected_system_prompt(tiny_tokenizer):
    tiny_tokenizer.chat_template = SMOLLM2
    ex = chat(("u", "What is 2+2?"), ("a", "4"), ("u", "And 3+3?"), ("a", "6"))
    sample = tokens(tiny_tokenizer, ex)
    assert tiny_tokenizer.decode(sample.input_ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    assert learnt(tiny_tokenizer, sample) == ["4<|im_end|>", "6<|im_end|>"]
    # an assistant-first conversation (no prompt at all) still finds its answer after the injection
    assert learnt(tiny_tokenizer, tokens(tiny_tokenizer, chat(("a", "Hello")))) == ["Hello<|im_end|>"]


def test_llama3_style_template_that_trims(tiny_tokenizer):
    tiny_tokenizer.chat_template = LLAMA3
    sample = tokens(tiny_tokenizer, chat(("u", "Who?"), ("a", "  Ada Marrow \n"), ("u", "When?"), ("a", "1874")))
    assert learnt(tiny_tokenizer, sample) == ["Ada Marrow<|eot_id|>", "1874<|eot_id|>"]
    assert sample.input_ids[0] == tiny_tokenizer.bos_token_id  # the template's BOS, not a doubled one
    assert sample.input_ids[1] != tiny_tokenizer.bos_token_id


def test_template_that_rewrites_content_is_a_user_error(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(UserError, match=r"d\.jsonl:1: the chat template does not write assistant message 2 verbatim"):
        tokens(tiny_tokenizer, chat(("u", "q"), ("a", "answer")))
    tiny_tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(
        UserError, match=r"d\.jsonl:1: the chat template rejected this conversation \(Conversation roles"
    ):
        tokens(tiny_tokenizer, chat(("u", "q"), ("a", "answer")))


def test_text_example_has_eos_and_is_all_labelled(tiny_tokenizer):
    sample = tokens(tiny_tokenizer, Example(messages=None, text="The quick brown fox.", where="t.txt:1"))
    assert sample.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(sample.input_ids) == "The quick brown fox.<|im_end|>"
    assert sample.labels == [IGNORE] + sample.input_ids[1:]


def test_truncate_keeps_the_head_and_drop_drops(tiny_tokenizer):
    ex = chat(("u", "Hi"), ("a", "The quick brown fox jumps over the lazy dog."))
    full = tokens(tiny_tokenizer, ex)
    cut = tokens(tiny_tokenizer, ex, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert tokens(tiny_tokenizer, ex, max_length=len(full.input_ids) - 3, overlong="drop") is None
    assert tokens(tiny_tokenizer, ex, max_length=len(full.input_ids), overlong="drop") == full
    assert tokens(tiny_tokenizer, ex, max_length=8) is None  # only prompt left: nothing to learn


def test_chat_template_fallback_and_override(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    ensure_chat_template(tiny_tokenizer)
    assert tiny_tokenizer.chat_template == CHATML
    ensure_chat_template(tiny_tokenizer, SMOLLM2)
    assert tiny_tokenizer.chat_template == SMOLLM2
    ensure_chat_template(tiny_tokenizer)
    assert tiny_tokenizer.chat_template == SMOLLM2  # its own template is kept
    with pytest.raises(UserError, match="config key data.chat_template"):
        ensure_chat_template(tiny_tokenizer, "{% for m in messages %}")


def write_jsonl(path, n, long_every=0):
    rows = []
    for i in range(n):
        answer = "The answer is 42." * (8 if long_every and i % long_every == 0 else 1)
        rows.append(json.dumps({"instruction": f"Question {i}?", "output": answer}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_stats_count_truncated_and_dropped(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", 6, long_every=3)  # examples 0 and 3 are long
    cfg = DataConfig(train=[train], max_length=48, overlong="truncate")
    samples, val, stats = build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=None)
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped, len(samples), val) == (6, 2, 0, 6, [])
    assert stats.n_tokens == sum(len(s.input_ids) for s in samples) and max(len(s.input_ids) for s in samples) == 48
    assert stats.n_label_tokens == sum(label != IGNORE for s in samples for label in s.labels)
    cfg.overlong = "drop"
    samples, _, stats = build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=None)
    assert (stats.n_truncated, stats.n_dropped, len(samples)) == (0, 2, 4)
    cfg.max_length = 8
    with pytest.raises(UserError, match=r"train\.jsonl: no training samples left: 6 of 6 dropped"):
        build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=None)


def test_validation_split_and_files(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", 8)
    cfg = DataConfig(train=[train], val_fraction=0.25)
    t1, v1, _ = build_datasets(cfg, tiny_tokenizer, seed=1, cache_dir=None)
    t2, v2, _ = build_datasets(cfg, tiny_tokenizer, seed=1, cache_dir=None)
    assert (len(t1), len(v1)) == (6, 2) and (t1, v1) == (t2, v2)
    assert {tuple(s.input_ids) for s in t1}.isdisjoint(tuple(s.input_ids) for s in v1)
    cfg.val_fraction = 0.01
    assert len(build_datasets(cfg, tiny_tokenizer, seed=1, cache_dir=None)[1]) == 1  # at least one
    cfg.validation = [write_jsonl(tmp_path / "val.jsonl", 3)]
    t3, v3, stats = build_datasets(cfg, tiny_tokenizer, seed=1, cache_dir=None)
    assert (len(t3), len(v3), stats.n_examples) == (8, 3, 11)
    one = DataConfig(train=[write_jsonl(tmp_path / "one.jsonl", 1)], val_fraction=0.5)
    with pytest.raises(UserError, match=r"one\.jsonl: 1 example\(s\) are too few"):
        build_datasets(one, tiny_tokenizer, seed=1, cache_dir=None)


def test_cache_hit_and_invalidation(tiny_tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    cfg = DataConfig(train=[write_jsonl(path, 5)], val_fraction=0.2)
    cache = tmp_path / "cache"
    t1, v1, s1 = build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)
    assert not s1.from_cache and len(list(cache.iterdir())) == 1
    t2, v2, s2 = build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)
    assert s2.from_cache and (t2, v2) == (t1, v1)
    assert (s2.n_examples, s2.n_tokens, s2.n_label_tokens) == (s1.n_examples, s1.n_tokens, s1.n_label_tokens)
    # a changed seed, config field, template or file is a different cache entry
    assert not build_datasets(cfg, tiny_tokenizer, seed=1, cache_dir=cache)[2].from_cache
    cfg.train_on_prompt = True
    assert not build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)[2].from_cache
    cfg.chat_template = SMOLLM2
    assert not build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)[2].from_cache
    write_jsonl(path, 6)
    assert not build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)[2].from_cache
    assert len(list(cache.iterdir())) == 5 and not list(cache.glob(".*"))  # no temp files left
    # a damaged cache file is rebuilt, not trusted
    for f in cache.iterdir():
        f.write_bytes(b"garbage")
    t3, _, s3 = build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)
    assert not s3.from_cache and build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=cache)[0] == t3


def test_missing_file_is_reported_even_with_a_cache(tiny_tokenizer, tmp_path):
    cfg = DataConfig(train=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        build_datasets(cfg, tiny_tokenizer, seed=0, cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="data.train"):
        build_datasets(DataConfig(), tiny_tokenizer, seed=0, cache_dir=None)
