"""The README and docs/ document every verb, flag and config key, and hold together as a site.

README.md is the front page (kept small); docs/*.md hold the detail. Verbs and flags may be
documented on any of them; every config key must be in docs/configuration.md; every docs page is
linked from the README; no relative link points at a missing file.
"""

import dataclasses
import re
import typing
from pathlib import Path

from tunesmith.cli import COMMANDS, build_parser
from tunesmith.config import Config

ROOT = Path(__file__).resolve().parents[2]
README_PATH = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README_PATH, *DOCS]
ALL_TEXT = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
README_MAX_BYTES = 20 * 1024

# [text](target) or [text](target "title"); images too. Targets in code spans and fenced blocks are
# not links, so those are stripped first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def test_every_verb_documented():
    for verb in COMMANDS:
        assert f"`tunesmith {verb}" in ALL_TEXT, f"README.md and docs/ do not document tunesmith {verb}"


def test_every_flag_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb, p in sub.choices.items():
        for action in p._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in ALL_TEXT, f"README.md and docs/ do not mention {verb} {flag}"


def test_readme_is_a_front_page():
    size = README_PATH.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: detail goes in docs/"


def test_every_docs_page_linked_from_readme():
    assert DOCS, "docs/ has no pages"
    linked = {t.split("#", 1)[0] for t in _links(README_PATH)}
    for page in DOCS:
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s):, mailto: and in-page anchors
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "relative links to missing files: " + ", ".join(broken)


def test_every_config_key_documented():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    sections = typing.get_type_hints(Config)  # config.py's annotations are strings
    keys = [f"{s.name}.{k.name}" for s in dataclasses.fields(Config) for k in dataclasses.fields(sections[s.name])]
    assert len(keys) > 50, keys
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, "docs/configuration.md does not document: " + ", ".join(missing)
