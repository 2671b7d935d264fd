"""The terminal table `tunesmith compare` prints: primary metric per arm × split with the guessing
baselines under the arms, the cost per arm, retrieval recall and forgetting; then the recommendation,
one paragraph per split (`eval.recommend`)."""

from __future__ import annotations

LABELS = {"majority": "majority guess", "base_majority": "base majority"}


def print_table(results: dict) -> None:
    primary = results["primary_metric"]
    splits = [s["name"] for s in results["splits"]]
    by = {(r["arm"], r["split"]): r for r in results["scores"] if r["metric"] == primary}
    print(f"\n{primary} (answer contained in the reply), mean [95% CI]; Δ = arm − base [95% CI], paired")
    print(
        f"  {'arm':<16}"
        + "".join(f"{s + ' (n=' + str(by[(results['arms'][0]['name'], s)]['n']) + ')':<34}" for s in splits)
    )
    for arm in results["arms"]:
        cells = []
        for s in splits:
            r = by[(arm["name"], s)]
            cell = f"{r['mean']:.0%} [{r['ci'][0]:.0%},{r['ci'][1]:.0%}]"
            if r["diff_vs_base"] is not None:
                cell += f" Δ{r['diff_vs_base']:+.0%}"
            cells.append(f"{cell:<34}")
        print(f"  {arm['name']:<16}" + "".join(cells))
    rows = (results.get("baselines") or {}).get("rows", [])
    guesses = {(r["arm"], r["split"]): r for r in rows if r["metric"] == primary}
    for name, label in LABELS.items():
        found = [guesses.get((name, s)) for s in splits]
        if any(found):
            cells = ["-" if r is None else f"{r['mean']:.0%} [{r['ci'][0]:.0%},{r['ci'][1]:.0%}]" for r in found]
            print(f"  {label:<16}" + "".join(f"{c:<34}" for c in cells))
    print(f"\n  {'arm':<16}{'train s':>9}{'p50 s':>8}{'p95 s':>8}{'prompt tok':>12}{'gen tok':>9}{'size MiB':>10}")
    for arm in results["arms"]:
        cst = results["cost"][arm["name"]]
        train = "-" if cst["train_wall_s"] is None else f"{cst['train_wall_s']:.0f}"
        p50 = "-" if cst["latency_p50_s"] is None else f"{cst['latency_p50_s']:.2f}"
        p95 = "-" if cst["latency_p95_s"] is None else f"{cst['latency_p95_s']:.2f}"
        print(
            f"  {arm['name']:<16}{train:>9}{p50:>8}{p95:>8}{cst['prompt_tokens_mean']:>12.0f}"
            f"{cst['generated_tokens_mean']:>9.1f}{cst['model_size_mib'] or 0:>10.0f}"
        )
    for r in results["retrieval"]:
        print(f"  retrieval {r['arm']} {r['split']}: recall@{r['k']} {r['recall_at_k']:.0%} (n={r['n']})")
    f = results["forgetting"]
    if f:
        print(
            f"  forgetting: perplexity on {f['text']} base {f['base_ppl']:.2f} → fine-tuned {f['finetuned_ppl']:.2f} "
            f"(×{f['ratio']:.3f})"
        )
    print_recommendations(results)


def print_recommendations(results: dict) -> None:
    recs = results.get("recommendations")
    if not recs:
        return
    print(f"\nrecommendation ({results['primary_metric']}, best arm vs each other arm, paired bootstrap 95% CI):")
    for rec in recs["splits"].values():
        print(f"  {rec['sentence']}")  # one line per split: a paragraph the terminal wraps
