"""The comparison report's HTML: content, escaping, no external resources, partial results."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
from html import escape
from pathlib import Path

import pytest
from PIL import Image

from tunesmith.errors import UserError
from tunesmith.eval.report import render_html, write_report

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "compare_results_example.json"


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(example())


def row(html: str, key: str) -> str:
    m = re.search(rf'<tr id="{key}">(.*?)</tr>', html, re.S)
    assert m, f"no row {key}"
    return m.group(1)


def cells(html: str, key: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", row(html, key), re.S)


def images(html: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(d))) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    ]


def test_every_arm_split_and_claim_row_is_shown(page):
    r = example()
    for a in r["arms"]:
        assert escape(a["label"]) in page and escape(a["description"]) in page
    for s in r["splits"]:
        assert escape(s["label"]) in page
    for key in ("aim", "knowledge", "uptodate", "usecases", "transparency", "domain", "resources", "forgetting"):
        assert len(cells(page, f"claim-{key}")) == 2 + len(r["arms"]) + 1  # claim, how, arms, verdict


def test_claim_rows_carry_the_measured_numbers(page):
    # Columns: the claim, measured as, base, prompt, rag, finetuned, finetuned_rag, verdict.
    knowledge = cells(page, "claim-knowledge")
    assert knowledge[5].startswith("71.0") and "[64.7, 77.3]" in knowledge[5]
    assert "Fine-tuned + RAG" in knowledge[7] and "CI overlaps Fine-tuned (LoRA)" in knowledge[7]
    uptodate = cells(page, "claim-uptodate")
    assert uptodate[4].startswith("62.0") and "most current: <b>RAG</b>" in uptodate[7]
    domain = cells(page, "claim-domain")
    assert "reference" in domain[2] and "Δ +54.5" in domain[4] and 'class="good"' in domain[4]
    transparency = cells(page, "claim-transparency")
    assert "no source to show" in transparency[2] and "recall@3: 91.5 on seen, 88.0 on doc_only" in transparency[4]
    resources = cells(page, "claim-resources")
    assert "train 221 s, RSS 1863 MiB" in resources[5] and "no training" in resources[2]
    assert "fastest answers: <b>Fine-tuned (LoRA)</b>" in resources[7]
    # seen 200 × 0.545 + doc_only 100 × 0.62 over 300 questions = 57.0
    assert cells(page, "claim-aim")[4].startswith("57.0")
    forgetting = cells(page, "claim-forgetting")
    assert "×1.009" in forgetting[1] and "CI includes no change vs base" in forgetting[7]


def test_headline_table_and_charts(page):
    rag = row(page, "score-rag")
    assert "<b>54.5</b>" in rag and "Δ +54.5" in rag and "Δ -10.0" in rag
    imgs = images(page)
    assert len(imgs) == 3 + 1  # one per split + the cost chart
    for img in imgs:
        assert img.format == "PNG" and img.size[0] >= 350 and img.size[1] >= 250


def test_no_external_resources(page):
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    refs = re.findall(r'\b(?:src|href|action|srcset)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "default-src 'none'; img-src data:" in page  # the CSP forbids fetches even if one slipped in


def test_hostile_strings_are_escaped(tmp_path):
    r = example()
    r["arms"][0]["label"] = "R&D <b>bold</b>"
    r["arms"][1]["description"] = '"><img src=x onerror=alert(1)>'
    r["model"]["run"] = "/tmp/<run>"
    r["settings"]["retriever"] = "<bm25>"
    r["splits"][0]["label"] = "<i>seen</i>"
    r["samples"][0]["question"] = "<script>alert('q')</script>"
    r["samples"][0]["prediction"] = "</td></tr></table><iframe src=x>"
    r["samples"][6]["retrieved"] = ["<style>body{display:none}</style>"]
    html = write_report(r, tmp_path).read_text()
    for raw in ("<script", "<img src=x", "<iframe", "<b>bold", "<run>", "<bm25>", "<i>seen", "<style>body"):
        assert raw not in html, raw
    for shown in (
        "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt;",
        "R&amp;D &lt;b&gt;bold&lt;/b&gt;",
        "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;",
        "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;&lt;iframe",
    ):
        assert shown in html, shown


def test_subset_of_arms_and_missing_sections(tmp_path):
    r = example()
    keep = {"base", "rag"}
    r["arms"] = [a for a in r["arms"] if a["name"] in keep]
    r["scores"] = [s for s in r["scores"] if s["arm"] in keep]
    r["cost"], r["samples"], r["forgetting"] = {}, [], None
    r["retrieval"] = [x for x in r["retrieval"] if x["arm"] in keep]
    r["splits"] = [s for s in r["splits"] if s["name"] != "doc_only"]
    r["scores"] = [s for s in r["scores"] if s["split"] != "doc_only"]
    html = write_report(r, tmp_path / "new" / "dir").read_text()
    assert "Fine-tuned" not in html and "finetuned" not in html
    assert len(cells(html, "claim-knowledge")) == 2 + 2 + 1
    assert "no &#x27;doc_only&#x27; split in this run" in cells(html, "claim-uptodate")[2]
    assert "Cost was not measured" in html and "No sample answers" in html
    assert "Perplexity ratio not measured" in html and "not measured in this run" in html
    assert "not measured" in cells(html, "claim-resources")[2]
    # the forgetting row ranks only arms that trained: RAG never did, so it is not "least loss"
    assert "nothing trained, nothing to forget" in cells(html, "claim-forgetting")[-1]
    assert "RAG" not in cells(html, "claim-forgetting")[-1] and "not trained" in cells(html, "claim-forgetting")[2]
    assert len(images(html)) == 2  # two splits, no cost chart
    # A RAG arm with no retrieval rows is still shown as one that retrieves, with recall unmeasured.
    r["retrieval"] = []
    r["samples"] = [
        {
            "arm": "rag",
            "split": "seen",
            "question": "q",
            "answer": "a",
            "prediction": "p",
            "correct": False,
            "retrieved": ["chunk"],
        }
    ]
    html = render_html(r)
    assert "recall not measured" in cells(html, "claim-transparency")[3]
    assert "No retrieval measured" in html


def test_bad_results_are_one_line_user_errors_and_keep_the_old_report(tmp_path):
    path = write_report(example(), tmp_path)
    before = path.read_bytes()
    for mutate, needle in [
        (lambda r: r.update(version=2), "version 2"),
        (lambda r: r.pop("scores"), "'scores'"),
        (lambda r: r["arms"][1].pop("name"), "arms[1]"),
        (lambda r: r["scores"][3].pop("mean"), "scores[3] lacks mean"),
    ]:
        r = copy.deepcopy(example())
        mutate(r)
        with pytest.raises(UserError, match=re.escape(needle)) as err:
            write_report(r, tmp_path)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="JSON object"):
        write_report([], tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
