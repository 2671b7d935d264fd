"""The slow tier shares one TUNESMITH_HOME so SmolLM2 is converted once per session."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/slow/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def slow_home(tmp_path_factory):
    return tmp_path_factory.mktemp("slow-home")


@pytest.fixture(autouse=True)
def _isolated_home(slow_home, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(slow_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
