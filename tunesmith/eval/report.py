"""The static HTML report of a `tunesmith compare` run.

Contract: `write_report(results, out_dir)` turns the `results.json` dict of a comparison (schema
version 1: arms, splits, scores with 95% CIs and deltas vs base, retrieval recall, cost,
forgetting, sample answers) into one self-contained `out_dir/report.html` and returns its path.
The page needs nothing beside itself: CSS is inline, charts are matplotlib PNGs embedded as
base64 `data:` URIs, there is no JavaScript, and a Content-Security-Policy forbids any fetch, so it
opens offline and can be mailed as one file. Every string taken from the results (questions,
answers, labels, paths) is HTML-escaped. Arms may be any subset; "retrieval", "forgetting" and
"samples" may be missing or empty, and the page then says what was not measured instead of
inventing it; so does the recommendation section (after the score table) when the results have no
`recommendations`. A dict without the keys the page needs raises `UserError` naming the key. The file
is written under a temporary name and renamed, so a failed write keeps the previous report.
"""

from __future__ import annotations

import base64
import io
import textwrap
from html import escape
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunesmith.errors import UserError
from tunesmith.eval.report_cells import Context, ci_text, delta, na, num, pct, swatch
from tunesmith.eval.report_claims import claims_table
from tunesmith.eval.table import LABELS as GUESS_LABELS
from tunesmith.io import write_atomic

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1240px;padding:0 16px;color:#1d1d1f;line-height:1.4;font-size:14px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#555}table{border-collapse:collapse;margin:8px 0;width:100%}
th,td{border:1px solid #d6d6d6;padding:5px 7px;vertical-align:top;text-align:left}
th{background:#f3f3f5}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.ci{color:#666;font-size:12px}.good{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
.na{color:#888;font-style:italic}.charts{display:flex;flex-wrap:wrap;gap:12px}
.charts img{border:1px solid #e3e3e3;max-width:100%}.ok{color:#137333}.ko{color:#b3261e}
td.text{max-width:380px;overflow-wrap:anywhere}details{font-size:12px;color:#444}
.swatch{display:inline-block;width:10px;height:10px;margin-right:5px;border-radius:2px}
"""
# No script, no fetch of any kind: images only from data: URIs, styles only inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def write_report(results: dict, out_dir: Path) -> Path:
    """Write `out_dir/report.html` for a comparison's results dict and return its path."""
    _check(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_dir / "report.html", render_html(results))


def render_html(results: dict) -> str:
    _check(results)
    ctx = Context(results)
    body = [
        _header(ctx),
        claims_table(ctx),
        _headline(ctx),
        _recommendations(ctx),
        _charts(ctx),
        _all_metrics(ctx),
        _cost(ctx),
        _retrieval(ctx),
        _forgetting(ctx),
        _samples(ctx),
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        "<title>tunesmith compare report</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _check(results) -> None:
    if not isinstance(results, dict):
        raise UserError("results: expected a JSON object (the results.json of tunesmith compare)")
    if results.get("version") != 1:
        raise UserError(f"results: version {results.get('version')!r} is not supported (expected 1)")
    for key in ("arms", "splits", "scores", "primary_metric"):
        if not results.get(key):
            raise UserError(f"results: key '{key}' is missing or empty")
    for key in ("arms", "splits"):
        for i, item in enumerate(results[key]):
            if not isinstance(item, dict) or not item.get("name"):
                raise UserError(f"results: {key}[{i}] needs a 'name'")
    for i, row in enumerate(results["scores"]):
        missing = [k for k in ("arm", "split", "metric", "mean") if k not in row]
        if missing:
            raise UserError(f"results: scores[{i}] lacks {', '.join(missing)}")


# ---- sections ----


def _header(ctx: Context) -> str:
    r, model = ctx.r, ctx.r.get("model") or {}
    settings = ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in (r.get("settings") or {}).items())
    arms = "".join(
        f"<tr><td>{swatch(ctx, a)}</td><td><code>{escape(a['name'])}</code></td>"
        f"<td>{escape(a.get('description') or '')}</td></tr>"
        for a in ctx.arms
    )
    splits = "".join(
        f"<tr><td><code>{escape(s['name'])}</code></td><td>{escape(s.get('label') or '')}</td>"
        f'<td class="num">{escape(str(s.get("n", "—")))}</td></tr>'
        for s in ctx.splits
    )
    wall = f", {r['wall_s']:.0f} s" if isinstance(r.get("wall_s"), (int, float)) else ""
    return (
        "<h1>Fine-tuning vs prompt engineering vs RAG</h1>"
        f'<p class="meta">tunesmith compare · base model <b>{escape(str(model.get("base", "?")))}</b>'
        f" · run <code>{escape(str(model.get('run', '—')))}</code> ({escape(str(model.get('method', '—')))})"
        f" · {escape(str(r.get('created', '')))}{wall}<br>settings: {settings or '—'}</p>"
        f"<p>Primary metric: <b>{escape(ctx.primary)}</b>. Scores are percentages with 95% bootstrap "
        "confidence intervals in brackets; Δ is the difference from the base model in percentage "
        'points, <span class="good">green</span> / <span class="bad">red</span> where its '
        "interval excludes zero.</p>"
        "<h2>Arms and question sets</h2><table><tr><th>arm</th><th>name</th><th>what it is</th></tr>"
        f"{arms}</table><table><tr><th>split</th><th>questions</th><th>n</th></tr>{splits}</table>"
    )


def _headline(ctx: Context) -> str:
    head = "".join(f"<th>{escape(s.get('label') or s['name'])}</th>" for s in ctx.splits)
    rows = []
    for a in ctx.arms:
        cells = []
        for s in ctx.splits:
            sc = ctx.score(a["name"], s["name"])
            cells.append(
                '<td class="num">'
                + (
                    f"<b>{pct(sc['mean'])}</b> {ci_text(sc.get('ci'))}<br>"
                    f"{delta(sc.get('diff_vs_base'), sc.get('diff_ci'))}"
                    if sc
                    else na("not run")
                )
                + "</td>"
            )
        rows.append(f'<tr id="score-{escape(a["name"])}"><td>{swatch(ctx, a)}</td>{"".join(cells)}</tr>')
    guesses = {(g["arm"], g["split"]): g for g in ctx.baselines if g.get("metric") == ctx.primary}
    for name, label in GUESS_LABELS.items():
        found = [guesses.get((name, s["name"])) for s in ctx.splits]
        if any(found):
            cells = "".join(
                f'<td class="num">{pct(g["mean"])} {ci_text(g.get("ci"))}</td>' if g else '<td class="num">—</td>'
                for g in found
            )
            rows.append(f'<tr id="guess-{name}"><td><i>{escape(label)}</i></td>{cells}</tr>')
    return (
        f"<h2>Results: {escape(ctx.primary)} per arm and question set</h2>"
        f"<table><tr><th>arm</th>{head}</tr>{''.join(rows)}</table>"
        "<p>The last rows are what guessing reaches: <i>majority guess</i> answers every question with the "
        "commonest gold answer of the other training facts of its kind (its first two words), <i>base majority</i> "
        "with the base model's most frequent answer on that split. An arm is above guessing only where its CI "
        "lies above them.</p>"
    )


def _recommendations(ctx: Context) -> str:
    recs = ctx.r.get("recommendations")
    if not recs or not recs.get("splits"):
        return "<h2>Recommendation</h2><p>" + na("No recommendation in these results (older results.json).") + "</p>"
    items = "".join(
        f'<li id="rec-{escape(str(name))}">{escape(str(rec.get("sentence", "")))}</li>'
        for name, rec in recs["splits"].items()
    )
    return (
        f"<h2>Recommendation</h2><ul>{items}</ul>"
        f'<p class="meta">How: {escape(str(recs.get("method", "")))}; a split with fewer than '
        f"{escape(str(recs.get('min_questions', '?')))} questions gets no recommendation.</p>"
    )


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No Software metadata: the page should carry no URL at all, even inside an image.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _split_chart(ctx: Context, split: dict) -> str:
    fig = Figure(figsize=(3.95, 3.3), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, a in enumerate(ctx.arms):
        sc = ctx.score(a["name"], split["name"])
        if sc is None:
            ax.text(i, 1, "n/a", ha="center", fontsize=8, color="#888")
            continue
        m = 100 * sc["mean"]
        lo, hi = (100 * c for c in sc["ci"]) if sc.get("ci") else (m, m)
        ax.bar(i, m, color=ctx.colour[a["name"]], yerr=[[max(m - lo, 0)], [max(hi - m, 0)]], capsize=4)
        ax.text(i, hi + 2, f"{m:.0f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(ctx.arms)), ["\n".join(textwrap.wrap(ctx.label(a), 11)) for a in ctx.arms], fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_ylabel(f"{ctx.primary} (%), 95% CI")
    ax.set_title(
        "\n".join(textwrap.wrap(f"{split.get('label') or split['name']} (n={split.get('n', '?')})", 48)), fontsize=9
    )
    return _img(_png(fig), f"{ctx.primary} on {split['name']} per arm")


def _cost_chart(ctx: Context) -> str | None:
    arms = [a for a in ctx.arms if ctx.cost.get(a["name"])]
    if not arms:
        return None
    fig = Figure(figsize=(8.4, 3.1), dpi=100, layout="constrained")
    lat, tok = fig.subplots(1, 2)
    names = ["\n".join(textwrap.wrap(ctx.label(a), 11)) for a in arms]
    for i, a in enumerate(arms):
        c, colour = ctx.cost[a["name"]], ctx.colour[a["name"]]
        if c.get("latency_p50_s") is not None:
            p50 = c["latency_p50_s"]
            p95 = c.get("latency_p95_s") or p50
            lat.bar(i, p50, color=colour, yerr=[[0], [max(p95 - p50, 0)]], capsize=4)
        if c.get("prompt_tokens_mean") is not None:
            tok.bar(i, c["prompt_tokens_mean"], color=colour)
    for ax, title in (
        (lat, "latency per answer, s (bar p50, whisker p95)"),
        (tok, "prompt tokens per question (mean)"),
    ):
        ax.set_xticks(range(len(arms)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
    return _img(_png(fig), "latency and prompt tokens per arm")


def _charts(ctx: Context) -> str:
    imgs = [_split_chart(ctx, s) for s in ctx.splits]
    cost = _cost_chart(ctx)
    return (
        '<h2>Charts</h2><div class="charts">'
        + "".join(imgs)
        + "</div>"
        + (f'<div class="charts">{cost}</div>' if cost else "")
    )


def _all_metrics(ctx: Context) -> str:
    head = "".join(f"<th>{escape(m)}</th>" for m in ctx.metrics)
    rows = []
    for s in ctx.splits:
        for a in ctx.arms:
            found = [ctx.score(a["name"], s["name"], m) for m in ctx.metrics]
            tds = "".join(
                f'<td class="num">{pct(sc["mean"])} {ci_text(sc.get("ci"))}</td>' if sc else '<td class="num">—</td>'
                for sc in found
            )
            rows.append(f"<tr><td><code>{escape(s['name'])}</code></td><td>{swatch(ctx, a)}</td>{tds}</tr>")
    return "<h2>Every metric</h2><table><tr><th>split</th><th>arm</th>" + head + "</tr>" + "".join(rows) + "</table>"


def _cost(ctx: Context) -> str:
    cols = [
        ("train_wall_s", "training s", ".0f"),
        ("train_peak_rss_mib", "training peak RSS MiB", ".0f"),
        ("latency_p50_s", "latency p50 s", ".3f"),
        ("latency_p95_s", "latency p95 s", ".3f"),
        ("answers_per_s", "answers / s", ".1f"),
        ("prompt_tokens_mean", "prompt tokens", ".1f"),
        ("generated_tokens_mean", "generated tokens", ".1f"),
        ("model_size_mib", "model MiB", ".1f"),
    ]
    if not ctx.cost:
        return "<h2>Cost</h2><p>" + na("Cost was not measured in this run.") + "</p>"
    head = "".join(f"<th>{t}</th>" for _, t, _ in cols)
    rows = "".join(
        f"<tr><td>{swatch(ctx, a)}</td>"
        + "".join(f'<td class="num">{num((ctx.cost.get(a["name"]) or {}).get(k), f)}</td>' for k, _, f in cols)
        + "</tr>"
        for a in ctx.arms
    )
    return f"<h2>Cost</h2><table><tr><th>arm</th>{head}</tr>{rows}</table>"


def _retrieval(ctx: Context) -> str:
    rows = [x for x in ctx.retrieval if any(a["name"] == x["arm"] for a in ctx.arms)]
    if not rows:
        return (
            "<h2>Retrieval</h2><p>"
            + na("No retrieval measured (no RAG arm in this run, or no split with fact ids).")
            + "</p>"
        )
    arm_by = {a["name"]: a for a in ctx.arms}
    body = "".join(
        f"<tr><td>{swatch(ctx, arm_by[x['arm']])}</td><td><code>{escape(x['split'])}</code></td>"
        f'<td class="num">{escape(str(x.get("k", "—")))}</td>'
        f'<td class="num">{pct(x.get("recall_at_k"))}</td>'
        f'<td class="num">{escape(str(x.get("n", "—")))}</td></tr>'
        for x in rows
    )
    return (
        "<h2>Retrieval</h2><p>recall@k: share of questions for which at least one of the k chunks put in "
        "the prompt contains the gold answer (the same <i>contains</i> rule as the scores); it does not check "
        "that the chunk is the fact's source, nor that the answer used it.</p>"
        "<table><tr><th>arm</th><th>split</th><th>k</th><th>recall@k %</th>"
        f"<th>n</th></tr>{body}</table>"
    )


def _forgetting(ctx: Context) -> str:
    fg = ctx.r.get("forgetting")
    if not fg:
        return "<h2>Forgetting</h2><p>" + na("Perplexity on general text was not measured in this run.") + "</p>"
    return (
        f"<h2>Forgetting</h2><p>Perplexity on <code>{escape(str(fg.get('text', '?')))}</code>: base "
        f"{num(fg.get('base_ppl'), '.3f')}, fine-tuned {num(fg.get('finetuned_ppl'), '.3f')}, ratio "
        f"<b>×{num(fg.get('ratio'), '.3f')}</b> (above 1 means the fine-tune lost some general language "
        "modelling).</p>"
    )


def _samples(ctx: Context) -> str:
    if not ctx.samples:
        return "<h2>Sample answers</h2><p>" + na("No sample answers were recorded.") + "</p>"
    arm_by = {a["name"]: a for a in ctx.arms}
    out = ["<h2>Sample answers</h2>"]
    for s in ctx.splits:
        rows = [x for x in ctx.samples if x.get("split") == s["name"] and x.get("arm") in arm_by]
        if not rows:
            continue
        trs = []
        for x in rows:
            mark = '<span class="ok">✓</span>' if x.get("correct") else '<span class="ko">✗</span>'
            chunks = x.get("retrieved")
            ctx_html = (
                f"<details><summary>{len(chunks)} retrieved chunks</summary><ol>"
                + "".join(f"<li>{escape(str(c))}</li>" for c in chunks)
                + "</ol></details>"
                if chunks
                else ""
            )
            trs.append(
                f"<tr><td>{swatch(ctx, arm_by[x['arm']])}</td>"
                f'<td class="text">{escape(str(x.get("question", "")))}</td>'
                f'<td class="text">{escape(str(x.get("answer", "")))}</td>'
                f'<td class="text">{mark} {escape(str(x.get("prediction", "")))}{ctx_html}</td></tr>'
            )
        out.append(
            f"<h3>{escape(s.get('label') or s['name'])}</h3><table><tr><th>arm</th><th>question</th>"
            f"<th>expected</th><th>answer</th></tr>{''.join(trs)}</table>"
        )
    return "".join(out)
