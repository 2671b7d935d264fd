"""The report's table of fine-tuning's usual claims: each qualitative row the literature gives
(aim, knowledge, up-to-date, use cases, transparency, domain specificity, resource use, forgetting)
replaced by the measurement that tests it on the user's data, with a verdict per row."""

from __future__ import annotations

from html import escape

from tunesmith.eval.arms import uses_finetuned
from tunesmith.eval.report_cells import Context, ci_text, delta, na, num, pct, swatch
from tunesmith.eval.scoring import guess_level


def claims_table(ctx: Context) -> str:
    """The literature's qualitative table of fine-tuning vs RAG, each row replaced by the measurement that tests it."""

    def acc_row(split: str):
        if not ctx.split(split):
            return {a["name"]: (na(f"no '{split}' split in this run"), None) for a in ctx.arms}
        out = {}
        for a in ctx.arms:
            sc = ctx.score(a["name"], split)
            out[a["name"]] = (
                (f"{pct(sc['mean'])} {ci_text(sc.get('ci'))}", sc["mean"], sc.get("ci"))
                if sc
                else (na("not run"), None)
            )
        return out

    def gain_row(split: str, trained_only: bool = False):
        out = {}
        for a in ctx.arms:
            sc = ctx.score(a["name"], split)
            if not sc:
                out[a["name"]] = (na(f"no '{split}' score"), None)
            elif trained_only and not uses_finetuned(a["name"]):  # never trained: nothing to forget, not ranked
                out[a["name"]] = (delta(sc.get("diff_vs_base"), sc.get("diff_ci")) + "<br>" + na("not trained"), None)
            else:
                out[a["name"]] = (
                    delta(sc.get("diff_vs_base"), sc.get("diff_ci")),
                    sc.get("diff_vs_base"),
                    sc.get("diff_ci"),
                )
        return out

    def aim_row():
        task = [s for s in ctx.splits if s["name"] != "general"]
        out = {}
        for a in ctx.arms:
            got = [(ctx.score(a["name"], s["name"]), s) for s in task]
            got = [(sc, s) for sc, s in got if sc]
            n = sum(sc.get("n") or s.get("n") or 0 for sc, s in got)
            if not got or not n:
                out[a["name"]] = (na("no task split scored"), None)
                continue
            mean = sum(sc["mean"] * (sc.get("n") or s.get("n") or 0) for sc, s in got) / n
            out[a["name"]] = (f'{pct(mean)} <span class="ci">(n={n})</span>', mean)
        return out

    def transparency_row():
        out = {}
        for a in ctx.arms:
            rows = [x for x in ctx.retrieval if x["arm"] == a["name"]]
            if rows:
                n = sum(x.get("n") or 0 for x in rows) or len(rows)
                mean = sum(x["recall_at_k"] * (x.get("n") or 1) for x in rows) / n
                parts = ", ".join(f"{pct(x['recall_at_k'])} on {escape(x['split'])}" for x in rows)
                k = escape(str(rows[0].get("k", "?")))
                out[a["name"]] = (f"shows the chunks it was given; recall@{k}: {parts}", mean)
            elif ctx.retrieves(a["name"]):
                out[a["name"]] = ("shows retrieved chunks; " + na("recall not measured"), None)
            else:
                out[a["name"]] = (na("answers from weights only: no source to show"), None)
        return out

    def resource_row():
        out = {}
        for a in ctx.arms:
            c = ctx.cost.get(a["name"])
            if not c:
                out[a["name"]] = (na("not measured"), None)
                continue
            train = (
                f"train {num(c.get('train_wall_s'), '.0f', ' s')}, "
                f"RSS {num(c.get('train_peak_rss_mib'), '.0f', ' MiB')}"
                if c.get("train_wall_s")
                else "no training"
            )
            out[a["name"]] = (
                f"{train}<br>p50 {num(c.get('latency_p50_s'), '.2f', ' s')}, "
                f"p95 {num(c.get('latency_p95_s'), '.2f', ' s')}<br>{num(c.get('prompt_tokens_mean'), '.0f')} "
                f"prompt tokens<br>{num(c.get('model_size_mib'), '.0f', ' MiB')} model",
                None if c.get("latency_p50_s") is None else -c["latency_p50_s"],
            )  # fastest ranks first
        return out

    fg = ctx.r.get("forgetting")
    ppl = (
        f" Perplexity on {escape(str(fg.get('text', 'general text')))}: base {num(fg.get('base_ppl'), '.2f')} → "
        f"fine-tuned {num(fg.get('finetuned_ppl'), '.2f')} (×{num(fg.get('ratio'), '.3f')})."
        if fg
        else " Perplexity ratio not measured in this run."
    )
    rows = [
        (
            "aim",
            "Aim",
            "adapts a pre-trained LLM with new content to suit a particular task or domain",
            "A goal, not a quantity. Proxy: primary metric over the task's own questions (every split but "
            "<code>general</code>, n-weighted, no CI).",
            aim_row(),
            "best on the task",
        ),
        (
            "knowledge",
            "Knowledge",
            "limited to knowledge in the base model",
            "Primary metric on <code>seen</code>: facts in the fine-tuning data, asked as held-out paraphrases.",
            acc_row("seen"),
            "knows most",
        ),
        (
            "uptodate",
            "Up-to-date",
            "static — expensive to extend",
            "Primary metric on <code>doc_only</code>: facts only in the documents, never trained on.",
            acc_row("doc_only"),
            "most current",
        ),
        (
            "usecases",
            "Use cases",
            "more general tasks and applications",
            "Primary metric on <code>general</code>: everyday questions outside the domain.",
            acc_row("general"),
            "most general",
        ),
        (
            "transparency",
            "Transparency",
            "less transparent",
            "Whether the arm can show where an answer came from: recall@k of retrieval (at least one of the k "
            "chunks shown contains the gold answer). Whether the answer <i>used</i> that chunk is not measured.",
            transparency_row(),
            "most traceable",
        ),
        (
            "domain",
            "Domain specificity",
            "fine-tuned to specific domains",
            "Gain over the base model on <code>seen</code> (Δ percentage points, 95% CI).",
            gain_row("seen"),
            "largest gain",
        ),
        (
            "resources",
            "Resource use",
            "upfront cost for fine-tuning",
            "Upfront: training wall time and peak RSS. Per answer: latency p50/p95, prompt tokens, model size "
            "(see the cost table).",
            resource_row(),
            "fastest answers",
        ),
        (
            "forgetting",
            "Forgetting (the claimed con: poor generalisation)",
            "poor generalisation outside the tuned use",
            "Change vs base on <code>general</code> (Δ percentage points, 95% CI); only fine-tuned arms are "
            "ranked (the others never trained)." + ppl,
            gain_row("general", trained_only=True),
            "least loss (fine-tuned arms)",
        ),
    ]
    head = "".join(f"<th>{swatch(ctx, a)}</th>" for a in ctx.arms)
    out = []
    splits = {"knowledge": "seen", "uptodate": "doc_only", "usecases": "general"}
    for key, dim, claim, how, cells, best_word in rows:
        guess = guess_level(ctx.r, splits[key], ctx.primary) if key in splits else None
        best = _verdict(ctx, cells, best_word, gain=key in ("domain", "forgetting"), guess=guess)
        if key == "forgetting" and not any(uses_finetuned(a["name"]) for a in ctx.arms):
            best = na("no fine-tuned arm in this run: nothing trained, nothing to forget")
        tds = "".join(f"<td>{cells[a['name']][0]}</td>" for a in ctx.arms)
        out.append(f'<tr id="claim-{key}"><th>{dim}</th><td><i>{claim}</i></td><td>{how}</td>{tds}<td>{best}</td></tr>')
    return (
        "<h2>Fine-tuning's usual claims, measured on your data</h2><p>Comparisons of fine-tuning with "
        "prompt engineering and RAG (e.g. Chaubey et al.) describe fine-tuning in seven qualitative rows; "
        "here each row is the number that tests it on your data, for every arm "
        f"(scores in % of <b>{escape(ctx.primary)}</b>).</p>"
        '<table><tr><th style="width:95px">row</th><th style="width:130px">the claim (fine-tuning)</th>'
        f'<th style="width:210px">measured as</th>{head}<th style="width:120px">verdict</th></tr>'
        + "".join(out)
        + "</table>"
    )


def _verdict(ctx: Context, cells: dict, word: str, gain: bool, guess: float | None = None) -> str:
    """Name the best arm of a row, and say so when its 95% CI does not separate it from the next;
    with a guessing level (the best baseline's mean), "above guessing" only when the CI clears it."""
    ranked = sorted(
        ((c[1], c[2] if len(c) > 2 else None, a) for a in ctx.arms if (c := cells[a["name"]])[1] is not None),
        key=lambda t: t[0],
        reverse=True,
    )
    if not ranked:
        return na("not measured")
    guessing = "" if guess is None else f"<br>{_guessing(ranked[0][1], guess)}"
    if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
        tied = [escape(ctx.label(t[2])) for t in ranked if t[0] == ranked[0][0]]
        return f"{word}: tie of <b>{'</b>, <b>'.join(tied)}</b>{guessing}"
    (v, ci, arm), notes = ranked[0], []
    if gain and v <= 0:
        word = "no arm beats base; closest"
    if gain and ci and ci[0] <= 0:
        notes.append("its CI includes no change vs base")
    if len(ranked) > 1 and ci and ranked[1][1] and ci[0] <= ranked[1][1][1]:
        notes.append(f"CI overlaps {escape(ctx.label(ranked[1][2]))}")
    extra = "".join(f'<br><span class="na">{n}</span>' for n in notes)
    return f"{word}: <b>{escape(ctx.label(arm))}</b>{extra}{guessing}"


def _guessing(ci, guess: float) -> str:
    if ci and ci[0] > guess:
        return f'<span class="good">above guessing</span> (CI above the best guess, {pct(guess)}%)'
    return f'<span class="na">not shown above guessing: the best guess reaches {pct(guess)}%</span>'
