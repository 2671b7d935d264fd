"""The README documents every verb of the command table."""

from pathlib import Path

from tunesmith.cli import COMMANDS, build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_verb_documented():
    for verb in COMMANDS:
        assert f"`tunesmith {verb}" in README, f"README does not document tunesmith {verb}"


def test_every_flag_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb, p in sub.choices.items():
        for action in p._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in README, f"README does not mention {verb} {flag}"
