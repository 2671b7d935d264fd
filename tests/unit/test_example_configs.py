"""Every example config parses; the repo's quickstart config is the packaged one."""

from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.workflows.quickstart import resource_dir

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_parses(path):
    cfg = load_config(path)
    for f in cfg.data.train + cfg.data.validation:
        assert Path(f).is_file(), f


def test_quickstart_configs_agree():
    repo = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    packaged = load_config(resource_dir() / "config.yaml")
    assert Path(repo.data.train[0]).resolve() == Path(packaged.data.train[0]).resolve()
    repo.data.train = packaged.data.train
    for key in ("questions", "documents"):
        assert Path(getattr(repo.compare, key)).resolve() == Path(getattr(packaged.compare, key)).resolve()
        setattr(repo.compare, key, getattr(packaged.compare, key))
    assert repo == packaged
