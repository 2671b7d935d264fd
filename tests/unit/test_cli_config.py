"""`tunesmith config show/keys` (every key has a one-line help), unknown verbs, overrides after flags, and
every `tunesmith[extra]` a message or doc names exists in pyproject.toml."""

import re
from pathlib import Path

import pytest

from tunesmith.cli import COMMANDS, main
from tunesmith.commands.config import KEY_HELP, defaults, key_help
from tunesmith.config import Config
from tunesmith.train.tracking import EXTRA

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_has_a_one_line_help_and_the_table_has_no_stale_keys():
    keys = defaults(Config())
    helps = key_help()
    missing = [k for k in keys if not helps.get(k, "").strip()]
    assert not missing, "config keys without help (a trailing comment in config.py): " + ", ".join(missing)
    assert all("\n" not in h for h in helps.values())
    stale = sorted(set(KEY_HELP) - set(keys))
    assert not stale, stale
    assert helps["train.save_every_minutes"].startswith("minutes between checkpoints")  # the comment itself
    assert helps["train.forward_tokens"].startswith("split a micro-batch")  # a comment block above the key


def test_config_keys_lists_every_key(capsys):
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(defaults(Config()))
    assert "train.report_to  (list[str], default [])  trackers" in "\n".join(lines)


def test_config_show_prints_resolved_values_defaults_and_help(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.001\n")
    assert main(["config", "show", str(cfg), "train.report_to=[mlflow]"]) == 0
    out = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert out.keys() == defaults(Config()).keys()
    assert out["train.lr"].startswith("train.lr = 0.001 ") and "(default 0.0002) peak learning rate" in out["train.lr"]
    assert "(default []) trackers" in out["train.report_to"] and '["mlflow"]' in out["train.report_to"]
    assert "# (default) minutes between checkpoints" in out["train.save_every_minutes"]


def test_config_show_bad_key_is_one_line(capsys):
    assert main(["config", "show", "train.report_to=[neptune]"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "tunesmith: error: config key train.report_to: expected one of tensorboard, mlflow, wandb, got 'neptune'"
    )


def test_train_compare_pretrain_help_point_to_config_keys(capsys):
    for verb in ("train", "compare", "pretrain"):
        assert _exit_code([verb, "--help"]) == 0
        assert "tunesmith config keys" in capsys.readouterr().out.replace("\n", " ")


def _exit_code(argv):
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


def test_unknown_verb_suggests_the_closest(capsys):
    assert _exit_code(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tunesmith: error: unknown verb 'trian'; did you mean train? (see tunesmith --help)"
    )
    assert _exit_code(["xyzzy"]) == 2
    assert capsys.readouterr().err.strip() == "tunesmith: error: unknown verb 'xyzzy'; (see tunesmith --help)"
    assert "config" in COMMANDS


def test_bad_flag_names_the_verb_help(capsys):
    assert _exit_code(["train", "--bogus"]) == 2
    assert capsys.readouterr().err.strip().endswith("(see tunesmith train --help)")


def test_overrides_after_a_flag_are_overrides(capsys):
    """`train c.yaml --force train.lr=...` applies the override (argparse alone calls it unrecognized)."""
    assert main(["train", "--force", "train.lr=-1"]) == 2
    assert capsys.readouterr().err.strip() == "tunesmith: error: config key train.lr: expected a number > 0, got -1.0"


def test_every_extra_named_anywhere_exists():
    toml = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+, tunesmith runs on 3.10
    section = toml.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([a-z0-9_-]+) = \[", section, re.M))
    assert {"llamacpp", "gguf", "dense", "tracking", "tensorboard", "test", "bench"} <= extras
    files = [*(ROOT / "tunesmith").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    files += [ROOT / "scripts" / "setup.sh"]
    named = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        for group in re.findall(r"tunesmith\[([a-z0-9_,\- ]+)\]", text) + re.findall(
            r"[.\"]\[([a-z0-9_,\- ]+)\]", text
        ):
            for name in group.split(","):
                named.setdefault(name.strip(), str(path.relative_to(ROOT)))
    named.update({extra: "tunesmith/train/tracking.py" for extra in EXTRA.values()})  # f-string messages
    assert "tracking" in named and "llamacpp" in named
    unknown = {n: where for n, where in named.items() if n not in extras}
    assert not unknown, f"extras named but not in pyproject.toml: {unknown}"
