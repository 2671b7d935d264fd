"""The quickstart's closing comparison on SmolLM2: five arms × three splits, with CIs and a report.

The numbers are whatever the model does; the assertions are the ones any honest run must meet:
every arm and split is there, the CIs bracket the means, the base model cannot know facts of an
invented island, and retrieval finds the document-only facts that fine-tuning never saw.
"""

import json


def test_quickstart_ends_with_the_comparison(quickstart_run):
    out, proc = quickstart_run
    res = json.loads((out / "compare" / "results.json").read_text())
    assert (out / "compare" / "report.html").stat().st_size > 10_000
    assert [a["name"] for a in res["arms"]] == ["base", "prompt", "rag", "finetuned", "finetuned_rag"]
    assert [s["name"] for s in res["splits"]] == ["seen", "doc_only", "general"]
    assert all(s["n"] == 20 for s in res["splits"])
    main = {(r["arm"], r["split"]): r for r in res["scores"] if r["metric"] == "contains"}
    for r in main.values():
        assert r["ci"][0] <= r["mean"] <= r["ci"][1]
    assert main[("base", "seen")]["mean"] <= 0.1 and main[("base", "doc_only")]["mean"] <= 0.1
    # fine-tuning taught the seen facts; only retrieval reaches the document-only ones
    assert main[("finetuned", "seen")]["diff_ci"][0] > 0
    assert main[("rag", "doc_only")]["diff_ci"][0] > 0
    # the quickstart also trains questions with retrieved chunks (data.context): with them, the tuned
    # model answers document-only facts it never trained on (the fixture keeps distractor-only copies)
    assert "30 conversations also trained with retrieved chunks" in proc.stdout
    assert "6 with distractors only" in proc.stdout
    assert main[("finetuned_rag", "doc_only")]["diff_ci"][0] > 0
    recall = {(r["arm"], r["split"]): r["recall_at_k"] for r in res["retrieval"]}
    assert recall[("rag", "doc_only")] >= 0.5
    assert 0.5 < res["forgetting"]["ratio"] < 2.0
    assert res["cost"]["finetuned"]["train_wall_s"] > 0
    assert "report in" in proc.stdout and "Δ = arm − base" in proc.stdout
