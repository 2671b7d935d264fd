"""Greedy generation with continuous batching gives the tokens HF `generate` gives.

The tiny model's weights are scaled up so that its replies differ from prompt to prompt, and two of
its frequent tokens act as stop tokens: rows stop at different steps, so rows leave the batch and
prompts join it mid-flight, and the KV buffers are rebuilt, on every run below.
"""

import collections
import random

import pytest
import torch

from tests.tiny import make_family_model, make_tiny_model, make_tokenizer
from tunesmith.infer import generate as G

WORDS = "the quick brown fox capital Zorbia Quell Lumen Guild answer moons Vantor Ada Marrow founded".split()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def lively_model(tok, seed: int):
    model = make_tiny_model(len(tok), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.normal_(0, 0.15, generator=generator)
    return model


def prompts(tok, n: int, system: str | None, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    convs = [
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))}]
        for _ in range(n)
    ]
    return [tok(G.render_prompt(tok, c), add_special_tokens=False)["input_ids"] for c in convs]


def until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    stop = next((n for n, t in enumerate(tokens) if t in stops), None)
    return tokens if stop is None else tokens[: stop + 1]


@pytest.mark.parametrize("system", [None, "Answer briefly. " + " ".join(WORDS)], ids=["no-shared-prefix", "shared"])
@pytest.mark.parametrize("seed", [0, 3])
def test_same_tokens_as_hf_generate(tok, system, seed):
    model = lively_model(tok, seed)
    encoded = prompts(tok, 29, system, seed)
    assert bool(G._shared_prefix(encoded)) == bool(system)
    first = G._hf_generate(model, encoded, 16, 8, [tok.eos_token_id], tok.pad_token_id, G._sampling(0, 1))
    frequent = [t for t, _ in collections.Counter(t for row in first for t in row).most_common(4)]
    stops = frequent[1:3]
    for batch_size, max_new in ((16, 16), (5, 9), (3, 2), (1, 6)):
        hf = G._hf_generate(model, encoded, max_new, batch_size, stops, tok.pad_token_id, G._sampling(0, 1))
        ours = G._greedy(model, encoded, max_new, batch_size, stops)
        assert [until_stop(t, stops) for t in ours] == [until_stop(t, stops) for t in hf]
        assert all(len(t) <= max_new for t in ours)
    lengths = {len(until_stop(t, stops)) for t in ours}
    assert len(lengths) > 1  # rows did stop at different steps


def test_generate_detailed_counts_and_text(tok):
    model = lively_model(tok, 1)
    convs = [[{"role": "user", "content": w}] for w in WORDS[:7]]
    texts, prompt_tokens, generated = G.generate_detailed(model, tok, convs, max_new_tokens=5, batch_size=3)
    assert prompt_tokens == [len(e) for e in prompts_of(tok, convs)]
    assert all(1 <= g <= 5 for g in generated)
    single = [G.generate_batch(model, tok, [c], max_new_tokens=5)[0] for c in convs]
    assert texts == single


def prompts_of(tok, convs):
    return [tok(G.render_prompt(tok, c), add_special_tokens=False)["input_ids"] for c in convs]


def test_shared_prefix_leaves_every_prompt_a_token():
    same = list(range(40))
    assert G._shared_prefix([same, same + [1]]) == same[:39]
    assert G._shared_prefix([same]) == []
    assert G._shared_prefix([same, [7] + same]) == []
    assert G._shared_prefix([same[:10] + [1], same[:10] + [2]]) == []  # under MIN_SHARED_PREFIX


def test_sliding_windows_keep_hf_generate(tok):
    assert G.continuous_batching_applies(make_tiny_model(len(tok)))
    assert not G.continuous_batching_applies(make_family_model("mistral", len(tok)))  # sliding_window set
