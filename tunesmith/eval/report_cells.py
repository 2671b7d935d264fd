"""What every section of the comparison report shares: the results indexed (`Context`), arm colours,
and the formatting of cells (every metric is a fraction, shown as a percentage; every string taken
from the results is HTML-escaped)."""

from __future__ import annotations

from html import escape

# Fixed colours per known arm, so an arm keeps its colour when others are switched off.
_COLOURS = {
    "base": "#8c8c8c",
    "prompt": "#ff7f0e",
    "rag": "#2ca02c",
    "finetuned": "#1f77b4",
    "finetuned_rag": "#9467bd",
}
_SPARE = ["#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


class Context:
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
        self.baselines = (r.get("baselines") or {}).get("rows") or []
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


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def ci_text(ci) -> str:
    return "" if not ci else f'<span class="ci">[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]</span>'


def delta(d, ci) -> str:
    if d is None:
        return '<span class="na">reference</span>'
    cls = ""
    if ci:
        cls = "good" if ci[0] > 0 else "bad" if ci[1] < 0 else ""
    ci_txt = f' <span class="ci">[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]</span>' if ci else ""
    return f'<span class="{cls}">Δ {100 * d:+.1f}</span>{ci_txt}'


def num(x, fmt: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def na(text: str) -> str:
    return f'<span class="na">{escape(text)}</span>'


def swatch(ctx: Context, arm: dict) -> str:
    return f'<span class="swatch" style="background:{ctx.colour[arm["name"]]}"></span>{escape(ctx.label(arm))}'
