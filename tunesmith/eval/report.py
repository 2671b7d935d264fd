"""The static HTML report of a `tunesmith compare` run.

Contract: `write_report(results, out_dir)` turns the `results.json` dict of a comparison (schema
version 1: arms, splits, scores with 95% CIs and deltas vs base, retrieval recall, cost,
forgetting, sample answers) into one self-contained `out_dir/report.html` and returns its path.
The page needs nothing beside itself: CSS is inline, charts are matplotlib PNGs embedded as
base64 `data:` URIs, there is no JavaScript, and a Content-Security-Policy forbids any fetch, so it
opens offline and can be mailed as one file. Every string taken from the results (questions,
answers, labels, paths) is HTML-escaped. Arms may be any subset; "retrieval", "forgetting" and
"samples" may be missing or empty, and the page then says what was not measured instead of
inventing it. A dict without the keys the page needs raises `UserError` naming the key. The file
is written under a temporary name and renamed, so a failed write keeps the previous report.
"""

from __future__ import annotations

import base64
import io
import os
import textwrap
from html import escape
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunesmith.errors import UserError

# Fixed colours per known arm, so an arm keeps its colour when others are switched off.
_COLOURS = {
    "base": "#8c8c8c",
    "prompt": "#ff7f0e",
    "rag": "#2ca02c",
    "finetuned": "#1f77b4",
    "finetuned_rag": "#9467bd",
}
_SPARE = ["#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]

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
    path = out_dir / "report.html"
    tmp = out_dir / f".report.html.tmp-{os.getpid()}"
    try:
        tmp.write_text(render_html(results), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def render_html(results: dict) -> str:
    _check(results)
    ctx = _Context(results)
    body = [
        _header(ctx),
        _claims_table(ctx),
        _headline(ctx),
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


class _Context:
    """The results, indexed the ways the sections look them up."""

    def __init__(self, r: dict):
        self.r = r
        self.arms = r["arms"]
        self.splits = r["splits"]
        self.primary = r["primary_metric"]
        self.metrics = r.get("metrics") or sorted({s["metric"] for s in r["scores"]})
        self.scores = {(s["arm"], s["split"], s["metric"]): s for s in r["scores"]}
        self.cost = r.get("cost") or {}
        self.retrieval = r.get("retrieval") or []
        self.samples = r.get("samples") or []
        spare = iter(_SPARE * 4)
        self.colour = {a["name"]: _COLOURS.get(a["name"]) or next(spare) for a in self.arms}

    def label(self, arm: dict) -> str:
        return arm.get("label") or arm["name"]

    def split(self, name: str) -> dict | None:
        return next((s for s in self.splits if s["name"] == name), None)

    def score(self, arm: str, split: str, metric: str | None = None) -> dict | None:
        return self.scores.get((arm, split, metric or self.primary))

    def retrieves(self, arm: str) -> bool:
        return any(x["arm"] == arm for x in self.retrieval) or any(
            s["arm"] == arm and s.get("retrieved") is not None for s in self.samples
        )


# ---- number formatting: every metric is a fraction, shown as a percentage ----


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f'<span class="ci">[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]</span>'


def _delta(d, ci) -> str:
    if d is None:
        return '<span class="na">reference</span>'
    cls = ""
    if ci:
        cls = "good" if ci[0] > 0 else "bad" if ci[1] < 0 else ""
    ci_txt = f' <span class="ci">[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]</span>' if ci else ""
    return f'<span class="{cls}">Δ {100 * d:+.1f}</span>{ci_txt}'


def _num(x, fmt: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def _na(text: str) -> str:
    return f'<span class="na">{escape(text)}</span>'


def _swatch(ctx: _Context, arm: dict) -> str:
    return f'<span class="swatch" style="background:{ctx.colour[arm["name"]]}"></span>{escape(ctx.label(arm))}'


# ---- sections ----


def _header(ctx: _Context) -> str:
    r, model = ctx.r, ctx.r.get("model") or {}
    settings = ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in (r.get("settings") or {}).items())
    arms = "".join(
        f"<tr><td>{_swatch(ctx, a)}</td><td><code>{escape(a['name'])}</code></td>"
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


def _headline(ctx: _Context) -> str:
    head = "".join(f"<th>{escape(s.get('label') or s['name'])}</th>" for s in ctx.splits)
    rows = []
    for a in ctx.arms:
        cells = []
        for s in ctx.splits:
            sc = ctx.score(a["name"], s["name"])
            cells.append(
                '<td class="num">'
                + (
                    f"<b>{_pct(sc['mean'])}</b> {_ci(sc.get('ci'))}<br>{_delta(sc.get('diff_vs_base'), sc.get('diff_ci'))}"
                    if sc
                    else _na("not run")
                )
                + "</td>"
            )
        rows.append(f'<tr id="score-{escape(a["name"])}"><td>{_swatch(ctx, a)}</td>{"".join(cells)}</tr>')
    return (
        f"<h2>Results: {escape(ctx.primary)} per arm and question set</h2>"
        f"<table><tr><th>arm</th>{head}</tr>{''.join(rows)}</table>"
    )


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No Software metadata: the page should carry no URL at all, even inside an image.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _split_chart(ctx: _Context, split: dict) -> str:
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


def _cost_chart(ctx: _Context) -> str | None:
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


def _charts(ctx: _Context) -> str:
    imgs = [_split_chart(ctx, s) for s in ctx.splits]
    cost = _cost_chart(ctx)
    return (
        '<h2>Charts</h2><div class="charts">'
        + "".join(imgs)
        + "</div>"
        + (f'<div class="charts">{cost}</div>' if cost else "")
    )


def _claims_table(ctx: _Context) -> str:
    """The literature's qualitative table of fine-tuning vs RAG, each row replaced by the measurement that tests it."""

    def acc_row(split: str):
        if not ctx.split(split):
            return {a["name"]: (_na(f"no '{split}' split in this run"), None) for a in ctx.arms}
        out = {}
        for a in ctx.arms:
            sc = ctx.score(a["name"], split)
            out[a["name"]] = (
                (f"{_pct(sc['mean'])} {_ci(sc.get('ci'))}", sc["mean"], sc.get("ci")) if sc else (_na("not run"), None)
            )
        return out

    def gain_row(split: str):
        out = {}
        for a in ctx.arms:
            sc = ctx.score(a["name"], split)
            if not sc:
                out[a["name"]] = (_na(f"no '{split}' score"), None)
            else:
                out[a["name"]] = (
                    _delta(sc.get("diff_vs_base"), sc.get("diff_ci")),
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
                out[a["name"]] = (_na("no task split scored"), None)
                continue
            mean = sum(sc["mean"] * (sc.get("n") or s.get("n") or 0) for sc, s in got) / n
            out[a["name"]] = (f'{_pct(mean)} <span class="ci">(n={n})</span>', mean)
        return out

    def transparency_row():
        out = {}
        for a in ctx.arms:
            rows = [x for x in ctx.retrieval if x["arm"] == a["name"]]
            if rows:
                n = sum(x.get("n") or 0 for x in rows) or len(rows)
                mean = sum(x["recall_at_k"] * (x.get("n") or 1) for x in rows) / n
                parts = ", ".join(f"{_pct(x['recall_at_k'])} on {escape(x['split'])}" for x in rows)
                k = escape(str(rows[0].get("k", "?")))
                out[a["name"]] = (f"shows the chunks it was given; recall@{k}: {parts}", mean)
            elif ctx.retrieves(a["name"]):
                out[a["name"]] = ("shows retrieved chunks; " + _na("recall not measured"), None)
            else:
                out[a["name"]] = (_na("answers from weights only: no source to show"), None)
        return out

    def resource_row():
        out = {}
        for a in ctx.arms:
            c = ctx.cost.get(a["name"])
            if not c:
                out[a["name"]] = (_na("not measured"), None)
                continue
            train = (
                f"train {_num(c.get('train_wall_s'), '.0f', ' s')}, "
                f"RSS {_num(c.get('train_peak_rss_mib'), '.0f', ' MiB')}"
                if c.get("train_wall_s")
                else "no training"
            )
            out[a["name"]] = (
                f"{train}<br>p50 {_num(c.get('latency_p50_s'), '.2f', ' s')}, "
                f"p95 {_num(c.get('latency_p95_s'), '.2f', ' s')}<br>{_num(c.get('prompt_tokens_mean'), '.0f')} "
                f"prompt tokens<br>{_num(c.get('model_size_mib'), '.0f', ' MiB')} model",
                None if c.get("latency_p50_s") is None else -c["latency_p50_s"],
            )  # fastest ranks first
        return out

    fg = ctx.r.get("forgetting")
    ppl = (
        f" Perplexity on {escape(str(fg.get('text', 'general text')))}: base {_num(fg.get('base_ppl'), '.2f')} → "
        f"fine-tuned {_num(fg.get('finetuned_ppl'), '.2f')} (×{_num(fg.get('ratio'), '.3f')})."
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
            "Whether the arm can show where an answer came from: recall@k of retrieval (the chunk holding the "
            "fact is among the k shown). Whether the answer <i>used</i> the chunk is not measured.",
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
            "Change vs base on <code>general</code> (Δ percentage points, 95% CI)." + ppl,
            gain_row("general"),
            "least loss",
        ),
    ]
    head = "".join(f"<th>{_swatch(ctx, a)}</th>" for a in ctx.arms)
    out = []
    for key, dim, claim, how, cells, best_word in rows:
        best = _verdict(ctx, cells, best_word, gain=key in ("domain", "forgetting"))
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


def _verdict(ctx: _Context, cells: dict, word: str, gain: bool) -> str:
    """Name the best arm of a row, and say so when its 95% CI does not separate it from the next."""
    ranked = sorted(
        ((c[1], c[2] if len(c) > 2 else None, a) for a in ctx.arms if (c := cells[a["name"]])[1] is not None),
        key=lambda t: t[0],
        reverse=True,
    )
    if not ranked:
        return _na("not measured")
    if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
        tied = [escape(ctx.label(t[2])) for t in ranked if t[0] == ranked[0][0]]
        return f"{word}: tie of <b>{'</b>, <b>'.join(tied)}</b>"
    (v, ci, arm), notes = ranked[0], []
    if gain and v <= 0:
        word = "no arm beats base; closest"
    if gain and ci and ci[0] <= 0:
        notes.append("its CI includes no change vs base")
    if len(ranked) > 1 and ci and ranked[1][1] and ci[0] <= ranked[1][1][1]:
        notes.append(f"CI overlaps {escape(ctx.label(ranked[1][2]))}")
    extra = "".join(f'<br><span class="na">{n}</span>' for n in notes)
    return f"{word}: <b>{escape(ctx.label(arm))}</b>{extra}"


def _all_metrics(ctx: _Context) -> str:
    head = "".join(f"<th>{escape(m)}</th>" for m in ctx.metrics)
    rows = []
    for s in ctx.splits:
        for a in ctx.arms:
            found = [ctx.score(a["name"], s["name"], m) for m in ctx.metrics]
            tds = "".join(
                f'<td class="num">{_pct(sc["mean"])} {_ci(sc.get("ci"))}</td>' if sc else '<td class="num">—</td>'
                for sc in found
            )
            rows.append(f"<tr><td><code>{escape(s['name'])}</code></td><td>{_swatch(ctx, a)}</td>{tds}</tr>")
    return "<h2>Every metric</h2><table><tr><th>split</th><th>arm</th>" + head + "</tr>" + "".join(rows) + "</table>"


def _cost(ctx: _Context) -> str:
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
        return "<h2>Cost</h2><p>" + _na("Cost was not measured in this run.") + "</p>"
    head = "".join(f"<th>{t}</th>" for _, t, _ in cols)
    rows = "".join(
        f"<tr><td>{_swatch(ctx, a)}</td>"
        + "".join(f'<td class="num">{_num((ctx.cost.get(a["name"]) or {}).get(k), f)}</td>' for k, _, f in cols)
        + "</tr>"
        for a in ctx.arms
    )
    return f"<h2>Cost</h2><table><tr><th>arm</th>{head}</tr>{rows}</table>"


def _retrieval(ctx: _Context) -> str:
    rows = [x for x in ctx.retrieval if any(a["name"] == x["arm"] for a in ctx.arms)]
    if not rows:
        return (
            "<h2>Retrieval</h2><p>"
            + _na("No retrieval measured (no RAG arm in this run, or no split with fact ids).")
            + "</p>"
        )
    arm_by = {a["name"]: a for a in ctx.arms}
    body = "".join(
        f"<tr><td>{_swatch(ctx, arm_by[x['arm']])}</td><td><code>{escape(x['split'])}</code></td>"
        f'<td class="num">{escape(str(x.get("k", "—")))}</td>'
        f'<td class="num">{_pct(x.get("recall_at_k"))}</td>'
        f'<td class="num">{escape(str(x.get("n", "—")))}</td></tr>'
        for x in rows
    )
    return (
        "<h2>Retrieval</h2><p>recall@k: share of questions whose fact's source chunk is among the k "
        "chunks put in the prompt.</p><table><tr><th>arm</th><th>split</th><th>k</th><th>recall@k %</th>"
        f"<th>n</th></tr>{body}</table>"
    )


def _forgetting(ctx: _Context) -> str:
    fg = ctx.r.get("forgetting")
    if not fg:
        return "<h2>Forgetting</h2><p>" + _na("Perplexity on general text was not measured in this run.") + "</p>"
    return (
        f"<h2>Forgetting</h2><p>Perplexity on <code>{escape(str(fg.get('text', '?')))}</code>: base "
        f"{_num(fg.get('base_ppl'), '.3f')}, fine-tuned {_num(fg.get('finetuned_ppl'), '.3f')}, ratio "
        f"<b>×{_num(fg.get('ratio'), '.3f')}</b> (above 1 means the fine-tune lost some general language "
        "modelling).</p>"
    )


def _samples(ctx: _Context) -> str:
    if not ctx.samples:
        return "<h2>Sample answers</h2><p>" + _na("No sample answers were recorded.") + "</p>"
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
                f"<tr><td>{_swatch(ctx, arm_by[x['arm']])}</td>"
                f'<td class="text">{escape(str(x.get("question", "")))}</td>'
                f'<td class="text">{escape(str(x.get("answer", "")))}</td>'
                f'<td class="text">{mark} {escape(str(x.get("prediction", "")))}{ctx_html}</td></tr>'
            )
        out.append(
            f"<h3>{escape(s.get('label') or s['name'])}</h3><table><tr><th>arm</th><th>question</th>"
            f"<th>expected</th><th>answer</th></tr>{''.join(trs)}</table>"
        )
    return "".join(out)
