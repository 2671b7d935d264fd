"""Shared fixtures: a tiny HF model dir built once per session, and an isolated TUNESMITH_HOME.

`train.precision=auto` is pinned to fp32 (`TUNESMITH_BF16_UNITS=0`) so the fp32 tolerances of the
suite hold on machines with and without bf16 matmul units; tests of the bf16 path set it to 1."""

import os

import pytest

from tests.tiny import make_tiny_model_dir, make_tokenizer

# at import, not in a fixture: module- and session-scoped fixtures (probes, trained runs) run before
# any function-scoped one could set it
os.environ["TUNESMITH_BF16_UNITS"] = "0"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TUNESMITH_BF16_UNITS", "0")
