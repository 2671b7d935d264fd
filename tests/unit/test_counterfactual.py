"""`data.context_counterfactual`: context copies whose answer is swapped, in the chunks and in the reply,
for another conversation's answer of the same kind — seeded, and only where the shown chunk names it."""

import json
import random

import pytest

from tunesmith.config import CompareConfig, DataConfig, load_config
from tunesmith.data.context import add_context, context_line
from tunesmith.data.counterfactual import answer_span, kind, pick_substitute, swap
from tunesmith.data.formats import load_examples
from tunesmith.errors import UserError

NAMES = ["Orla Penhallow", "Bram Totteridge", "Cass Wimberly", "Dunstan Pollexfen", "Edda Quorrel"]


@pytest.fixture()
def setup(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    rows = []
    for i in range(20):
        keeper, place = f"{NAMES[i % 5]}{i}", f"cape{i}"
        (docs / f"d{i:02d}.md").write_text(f"The lighthouse at {place} was painted white. Its keeper was {keeper}.\n")
        messages = [
            {"role": "user", "content": f"Who kept the lighthouse at {place}?"},
            {"role": "assistant", "content": f"The keeper there was {keeper}."},
        ]
        rows.append(json.dumps({"messages": messages}))
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    data = DataConfig(train=[str(tmp_path / "t.jsonl")], context=True, context_distractor_only=0.0)
    return data, CompareConfig(documents=str(docs), top_k=3, chunk_size=40, chunk_overlap=5)


def test_answer_span_names_the_answer():
    df = {"orla": 4, "penhallow0": 1, "the": 20, "1841": 1, "vane": 1, "cottage": 1, "keeper": 20}
    texts = ["its keeper was orla penhallow0.", "first lit in 1841.", "the vane cottage is old."]
    answer = "The keeper there was Orla Penhallow0."
    assert answer[slice(*answer_span("Who kept it?", answer, texts, df, 2))] == "Orla Penhallow0"
    answer = "It was first lit in 1841."
    assert answer[slice(*answer_span("When was it lit?", answer, texts, df, 2))] == "1841"
    # a sentence's common first word is not part of the name; a rare one is
    answer = "The Vane Cottage is the oldest."
    assert answer[slice(*answer_span("Which is oldest?", answer, texts, df, 2))] == "Vane Cottage"
    # no span: the name is in the question, no word of it is rare, or no shown chunk holds it
    assert answer_span("Is Orla Penhallow0 the keeper?", "Orla Penhallow0.", texts, df, 2) is None
    assert answer_span("Who?", "The Keeper.", texts, df, 2) is None
    assert answer_span("Who kept it?", "The keeper there was Orla Penhallow0.", texts[1:], df, 2) is None
    assert kind("1841") == ("number", 4) and kind("QH-4") == ("name", 2)
    rng = random.Random(0)
    pool = ["Orla Penhallow0", "Bram Totteridge1", "1853"]
    assert pick_substitute("Orla Penhallow0", pool, rng) == "Bram Totteridge1"
    assert pick_substitute("1841", ["Orla Penhallow0", "1841"], rng) is None
    keeper = "The keeper there was Orla Penhallow0."
    span = (keeper.index("Orla"), keeper.index("."))
    chunks, reply = swap(["Keeper ORLA PENHALLOW0, not Orla Penhallow01."], keeper, span, "Bram Totteridge1")
    assert chunks == ["Keeper Bram Totteridge1, not Orla Penhallow01."]  # whole words, any case
    assert reply == "The keeper there was Bram Totteridge1."
    # a chunk cut inside a two-word name gets the new name's matching word at that edge
    brisk = "The Brisk Water."
    chunks, _ = swap(
        ["Its tributary is the Brisk", "Water. Then Brisk Water again"], brisk, (4, 15), "Hilda Brackwater"
    )
    assert chunks == ["Its tributary is the Hilda", "Brackwater. Then Hilda Brackwater again"]
    chunks, reply = swap(["The Vane Cottage is old; the vane cottage stands."], answer, (4, 16), "The Mill House")
    assert chunks == ["The Mill House is old; the Mill House stands."] and reply == "The Mill House is the oldest."


def test_counterfactual_copies_are_read_not_remembered(setup):
    data, compare = setup
    examples = load_examples(data.train, "messages", None)
    plain, _ = add_context(examples, data, compare, seed=5)
    data.context_counterfactual = 0.5
    out, stats = add_context(examples, data, compare, seed=5)
    assert out[:20] == examples and len(out) == 40
    assert (stats.n_context, stats.n_counterfactual) == (20, 10)
    swapped = 0
    for ex, before in zip(out[20:], plain[20:]):
        if ex == before:
            continue
        swapped += 1
        name = ex.messages[-1]["content"].removeprefix("The keeper there was ").rstrip(".")
        was = before.messages[-1]["content"].removeprefix("The keeper there was ").rstrip(".")
        assert name != was and name in ex.messages[0]["content"] and f"{was}." not in ex.messages[0]["content"]
        assert ex.messages[0]["content"].split("Question: ")[1] == before.messages[0]["content"].split("Question: ")[1]
    assert swapped == 10
    assert add_context(examples, data, compare, seed=5)[0] == out and add_context(examples, data, compare, 6)[0] != out
    assert context_line(vars(stats), "d", 512).endswith("0 with distractors only, 10 with the answer swapped")


def test_bad_counterfactual_share():
    with pytest.raises(UserError, match=r"config key data\.context_counterfactual: expected 0 <= value <= 1, got 1\.5"):
        load_config(None, ["data.context=true", "compare.documents=docs", "data.context_counterfactual=1.5"])
