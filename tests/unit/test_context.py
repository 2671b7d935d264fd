"""`data.context`: training copies whose question carries retrieved chunks (RAFT), asked token for token
as `tunesmith compare`'s `finetuned_rag` arm asks, with seeded oracle / distractor-only fractions."""

import json

import pytest

from tunesmith.config import CompareConfig, Config, DataConfig, load_config
from tunesmith.data.context import add_context
from tunesmith.data.formats import load_examples
from tunesmith.data.sft import IGNORE, _cache_key, build_datasets, ensure_chat_template
from tunesmith.data.sources import open_sources
from tunesmith.errors import UserError

KEEPERS = ["Orla Penhallow", "Bram Totteridge", "Cass Wimberly", "Dunstan Pollexfen", "Edda Quorrel"]
PLACES = ["northcape", "saltmere", "greyholm", "ravensk", "dunlow", "kestrel", "farrow", "milbeck"]


def write_docs(folder, n=20):
    folder.mkdir()
    for i in range(n):
        keeper = f"{KEEPERS[i % len(KEEPERS)]}{i}"
        place = f"{PLACES[i % len(PLACES)]}{i}"
        (folder / f"doc{i:02d}.md").write_text(
            f"The lighthouse at {place} was painted white. Its keeper was {keeper}, who kept a log of ships.\n"
        )
    return folder


def write_train(path, n=20):
    rows = []
    for i in range(n):
        place, keeper = f"{PLACES[i % len(PLACES)]}{i}", f"{KEEPERS[i % len(KEEPERS)]}{i}"
        messages = [
            {"role": "user", "content": f"Who kept the lighthouse at {place}?"},
            {"role": "assistant", "content": f"The keeper there was {keeper}."},
        ]
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture()
def setup(tmp_path):
    docs = write_docs(tmp_path / "docs")
    train = write_train(tmp_path / "train.jsonl")
    data = DataConfig(train=[train], format="messages", max_length=2048, system_prompt="Answer briefly.", context=True)
    compare = CompareConfig(documents=str(docs), top_k=3, chunk_size=40, chunk_overlap=5)
    return data, compare, docs


def test_training_prompt_is_the_finetuned_rag_prompt(setup, tiny_tokenizer):
    """The must-show: each training copy's tokens up to its first label are exactly the tokens of
    the prompt that compare's finetuned_rag arm renders for the same question."""
    from tunesmith.eval.arms import conversation
    from tunesmith.eval.compare import _retrieval
    from tunesmith.infer.generate import render_prompt

    data, compare, _ = setup
    data.context_distractor_only = 0.0
    ensure_chat_template(tiny_tokenizer)
    train, _, stats = build_datasets(data, tiny_tokenizer, seed=3, cache_dir=None, compare=compare)
    assert stats.context["n_context"] == 20 and len(train) == 40
    assert stats.context["n_oracle_retrieved"] == 20  # so the chunks are the retriever's top-k, as the arm's

    cfg = Config(data=data, compare=compare)
    chunks, retrieve = _retrieval(cfg)
    questions = [ex.messages[1]["content"] for ex in load_examples(data.train, "messages", data.system_prompt)]
    contexts = [[chunks[i].text for i in row] for row in retrieve(questions, compare.top_k)]
    for q, ctx, sample in zip(questions, contexts, train[20:]):
        conv = conversation("finetuned_rag", q, data.system_prompt, compare.prompt_system, [], ctx)
        arm_ids = tiny_tokenizer(render_prompt(tiny_tokenizer, conv), add_special_tokens=False)["input_ids"]
        first_label = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
        assert sample.input_ids[:first_label] == arm_ids and ctx[0] in tiny_tokenizer.decode(arm_ids)
    # the plain copies stay as they were: the finetuned arm without context is still trained
    plain, _, _ = build_datasets(DataConfig(**{**vars(data), "context": False}), tiny_tokenizer, 3, None)
    assert train[:20] == plain


def test_oracle_and_distractor_only_fractions_are_seeded(setup):
    data, compare, _ = setup
    examples = load_examples(data.train, "messages", None)
    data.context_fraction, data.context_distractor_only = 0.5, 0.3
    out, stats = add_context(examples, data, compare, seed=7)
    assert out[:20] == examples and len(out) == 30
    assert (stats.n_context, stats.n_distractor_only, stats.n_oracle_found) == (10, 3, 10)
    without = 0
    for ex in out[20:]:
        keeper = ex.messages[-1]["content"].removeprefix("The keeper there was ").rstrip(".")
        user = ex.messages[0]["content"]
        assert user.count("\n[") == 3 and user.startswith("Answer the question using the context below.")
        without += keeper not in user
    assert without == 3  # exactly the distractor-only copies lack the answer's chunk
    again, _ = add_context(examples, data, compare, seed=7)
    other, _ = add_context(examples, data, compare, seed=8)
    assert again == out and other != out


def test_oracle_put_in_when_the_retriever_misses_it(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.md").write_text(f"The mystery person number {i} is unknown to all of us.\n")
    (docs / "z.md").write_text("Zelda Quorn lives by the sea in a tall blue house.\n")
    train = tmp_path / "t.jsonl"
    msgs = [{"role": "user", "content": "Who is the mystery person?"}, {"role": "assistant", "content": "Zelda Quorn."}]
    train.write_text(json.dumps({"messages": msgs}) + "\n")
    data = DataConfig(train=[str(train)], context=True, context_distractor_only=0.0)
    compare = CompareConfig(documents=str(docs), top_k=3)
    out, stats = add_context(load_examples(data.train, "messages", None), data, compare, seed=0)
    user = out[1].messages[0]["content"]
    assert (stats.n_oracle_found, stats.n_oracle_retrieved) == (1, 0)
    assert "Zelda Quorn lives" in user and user.count("mystery person number") == 2


def test_cache_key_covers_documents_and_retrieval(setup, tiny_tokenizer):
    data, compare, docs = setup

    def key(d=data, c=compare):
        return _cache_key(d, tiny_tokenizer, 0, *open_sources(d), c)

    first = key()
    assert key() == first
    (docs / "doc00.md").write_text("A changed document about the lighthouse.\n")
    changed = key()
    assert changed != first
    (docs / "new.txt").write_text("Another document.\n")
    assert key() != changed
    assert key(c=CompareConfig(**{**vars(compare), "top_k": 2})) != key()
    assert key(c=CompareConfig(**{**vars(compare), "retriever": "hybrid"})) != key()
    assert key(d=DataConfig(**{**vars(data), "context_distractor_only": 0.5})) != key()
    assert key(d=DataConfig(**{**vars(data), "context_counterfactual": 0.5})) != key()
    plain = DataConfig(**{**vars(data), "context": False})
    assert key(d=plain) == key(d=plain, c=CompareConfig())  # without context the documents do not count


def test_context_from_cache_keeps_its_stats(setup, tiny_tokenizer, tmp_path):
    data, compare, _ = setup
    ensure_chat_template(tiny_tokenizer)
    t1, _, s1 = build_datasets(data, tiny_tokenizer, 0, tmp_path / "cache", compare)
    t2, _, s2 = build_datasets(data, tiny_tokenizer, 0, tmp_path / "cache", compare)
    assert s2.from_cache and t1 == t2 and s2.context == s1.context and s1.context["n_context"] == 20


def test_copies_cut_by_max_length_are_counted(setup, tiny_tokenizer):
    from tunesmith.data.context import context_line

    data, compare, _ = setup
    data.max_length = 128  # a plain conversation fits (≤ 86 tokens); three chunks of context do not (≥ 409)
    ensure_chat_template(tiny_tokenizer)
    train, _, stats = build_datasets(data, tiny_tokenizer, 0, None, compare)
    assert stats.context["n_cut"] == 20 and stats.n_truncated + stats.n_dropped == 20
    assert "20 longer than data.max_length=128 (truncated or dropped): raise it" in context_line(
        stats.context, "d", 128
    )


def test_bad_context_settings(setup, tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"config key data\.documents: data\.context needs a documents folder"):
        load_config(None, ["data.context=true"])
    for key in ("data.context_fraction", "data.context_distractor_only"):
        with pytest.raises(UserError, match=rf"config key {key}: expected 0 <= value <= 1, got 1\.5"):
            load_config(None, ["data.context=true", "compare.documents=docs", f"{key}=1.5"])
    assert load_config(None, ["data.context=true", "compare.documents=docs"]).data.documents is None
    (tmp_path / "c.yaml").write_text("data:\n  context: true\n  documents: docs\n")  # relative to the YAML
    assert load_config(tmp_path / "c.yaml").data.documents == str(tmp_path / "docs")
    data, compare, _ = setup
    data.documents = str(tmp_path / "missing")
    with pytest.raises(UserError, match=r"config key data\.documents: .*missing is not a folder"):
        build_datasets(data, tiny_tokenizer, 0, tmp_path / "cache", compare)
    (tmp_path / "empty").mkdir()
    data.documents = str(tmp_path / "empty")
    with pytest.raises(UserError, match=r"config key data\.documents: .*empty holds no \.txt, \.md or \.jsonl"):
        build_datasets(data, tiny_tokenizer, 0, tmp_path / "cache", compare)
    (tmp_path / "empty" / "blank.md").write_text("\n  \n")
    with pytest.raises(UserError, match=r"config key data\.documents: the files in .*empty contain no text"):
        build_datasets(data, tiny_tokenizer, 0, tmp_path / "cache", compare)
