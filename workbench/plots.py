"""Pure functions from a run document to plotly figures (no I/O, no UI state), shared by the UI and reports."""

from __future__ import annotations

from typing import Any, Sequence

MB = 1e6


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are to be minimised (size, perplexity), by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier, best = [], float("inf")
    for index in order:
        if points[index][1] < best:
            frontier.append(index)
            best = points[index][1]
    return frontier


def _ok(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in run["variants"] if r["status"] == "ok"]


def _title(text: str, run: dict[str, Any]) -> str:
    note = " (fp32 = Q4_1 GGUF dequantized)" if "dequantized" in (run["model"].get("note") or "") else ""
    return f"{text}{note}"


def size_vs_perplexity(run: dict[str, Any]):
    import plotly.graph_objects as go

    records = [r for r in _ok(run) if r["metrics"]["perplexity"] is not None and r["metrics"]["disk_bytes"]]
    points = [(r["metrics"]["disk_bytes"] / MB, r["metrics"]["perplexity"]) for r in records]
    frontier = pareto_frontier(points)
    figure = go.Figure()
    # Mixed-precision files chosen under a budget (gguf-auto) are marked apart from uniform types.
    auto = [bool((r.get("gguf") or {}).get("auto")) for r in records]
    figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers+text",
                                text=[f"{r['name']} [{r['honesty']}]" + (" (mixed, auto)" if a else "")
                                      for r, a in zip(records, auto)], textposition="top center",
                                name="variants", marker={"size": [14 if a else 10 for a in auto],
                                                         "symbol": ["diamond" if a else "circle" for a in auto]}))
    figure.add_trace(go.Scatter(x=[points[i][0] for i in frontier], y=[points[i][1] for i in frontier],
                                mode="lines", name="Pareto frontier", line={"dash": "dash"}))
    figure.update_layout(title=_title("Size on disk vs perplexity", run), xaxis_title="disk MB", yaxis_title="perplexity")
    return figure


def memory(run: dict[str, Any]):
    import plotly.graph_objects as go

    records = _ok(run)
    names = [r["name"] for r in records]
    figure = go.Figure([
        go.Bar(name="weights MB", x=names, y=[(r["metrics"]["weight_bytes"] or 0) / MB for r in records]),
        go.Bar(name="peak process RSS MB", x=names, y=[(r["metrics"]["peak_rss_bytes"] or 0) / MB for r in records]),
    ])
    figure.update_layout(barmode="group", title=_title("Memory: weights vs peak process", run), yaxis_title="MB")
    return figure


def latency(run: dict[str, Any]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = _ok(run)
    names = [r["name"] for r in records]
    m = [r["metrics"] for r in records]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("time to first token (ms)", "decode tok/s"))
    figure.add_trace(go.Bar(x=names, y=[x["ttft_s"] * 1000 for x in m], name="TTFT ms", error_y={
        "type": "data", "symmetric": False, "array": [(x["ttft_s_max"] - x["ttft_s"]) * 1000 for x in m],
        "arrayminus": [(x["ttft_s"] - x["ttft_s_min"]) * 1000 for x in m]}), row=1, col=1)
    figure.add_trace(go.Bar(x=names, y=[x["decode_tok_s"] for x in m], name="decode tok/s", error_y={
        "type": "data", "symmetric": False, "array": [x["decode_tok_s_max"] - x["decode_tok_s"] for x in m],
        "arrayminus": [x["decode_tok_s"] - x["decode_tok_s_min"] for x in m]}), row=1, col=2)
    roof = [(r["name"], r["roofline"]) for r in records if (r.get("roofline") or {}).get("decode_tok_s_limit")]
    if roof:  # the memory-bandwidth limit of each variant's decode speed (roofline.py)
        figure.add_trace(go.Scatter(
            x=[n for n, _ in roof], y=[x["decode_tok_s_limit"] for _, x in roof], mode="markers+text",
            name="bandwidth limit", marker={"symbol": "line-ew-open", "size": 28, "line": {"width": 3}},
            text=[f"limit {x['decode_tok_s_limit']:.0f}" + (f" ({x['fraction']:.0%})" if x["fraction"] else "")
                  for _, x in roof], textposition="top center"), row=1, col=2)
    figure.update_layout(title=_title("Latency (median, min-max bars)", run), showlegend=False)
    return figure


def sparsity_heatmap(run: dict[str, Any]):
    import plotly.graph_objects as go

    records = [r for r in _ok(run) if r["layers"]]
    layer_names = list(dict.fromkeys(layer["name"] for r in records for layer in r["layers"]))
    z = [[next((l["sparsity"] for l in r["layers"] if l["name"] == name), None) for name in layer_names] for r in records]
    figure = go.Figure(go.Heatmap(z=z, x=layer_names, y=[r["name"] for r in records], colorscale="Viridis",
                                  colorbar={"title": "zero fraction"}))
    figure.update_layout(title=_title("Per-layer sparsity", run), xaxis={"showticklabels": False, "title": "layers"})
    return figure


def divergence(run: dict[str, Any]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = [r for r in _ok(run) if r["metrics"]["kld_mean"] is not None]
    names = [r["name"] for r in records]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("mean KLD vs baseline", "top-1 agreement"))
    figure.add_trace(go.Bar(x=names, y=[r["metrics"]["kld_mean"] for r in records], name="KLD"), row=1, col=1)
    figure.add_trace(go.Bar(x=names, y=[r["metrics"]["top1_agreement"] for r in records], name="top-1"), row=1, col=2)
    figure.update_layout(title=_title(f"Divergence from {run['preset']['baseline']}", run), showlegend=False)
    return figure


def sensitivity(run: dict[str, Any]):
    import plotly.graph_objects as go

    rows = (run.get("sensitivity") or {}).get("rows") or []
    figure = go.Figure(go.Bar(x=[r["name"] for r in rows], y=[r["kld_mean"] for r in rows]))
    figure.update_layout(title=f"Per-block sensitivity of {(run.get('sensitivity') or {}).get('variant', '—')}",
                         yaxis_title="KLD with only this block compressed")
    return figure


def calibration_spread(run: dict[str, Any]):
    """Perplexity of each calibration of a recipe, one column per recipe: the spread is the luck."""
    import plotly.graph_objects as go

    from workbench.robustness import calibration_groups

    figure = go.Figure()
    for group in calibration_groups(run):
        label = " + ".join(s["method"] for s in group["recipe"])
        figure.add_trace(go.Scatter(
            x=[label] * len(group["members"]), y=[m["perplexity"] for m in group["members"]], mode="markers", name=label,
            text=[f"{m['name']}: text {m['calibration'].get('text', 'pydoc')}, seed {m['calibration'].get('seed', 0)}"
                  for m in group["members"]], hoverinfo="text+y", marker={"size": 11}))
    figure.update_layout(title=_title("Calibration robustness: perplexity per calibration set", run),
                         yaxis_title="perplexity", showlegend=False)
    return figure


def downstream_tasks(run: dict[str, Any]):
    """lm-eval scores per variant (one bar group per task metric), with their standard errors."""
    import plotly.graph_objects as go

    records = _ok(run)
    metrics = sorted({m for r in records for m, v in r["metrics"].items()
                      if m.startswith("lm_eval.") and not m.endswith("_stderr") and v is not None})
    figure = go.Figure()
    for metric in metrics:
        with_value = [r for r in records if r["metrics"].get(metric) is not None]
        figure.add_trace(go.Bar(
            x=[r["name"] for r in with_value], y=[r["metrics"][metric] for r in with_value],
            error_y={"type": "data", "array": [r["metrics"].get(metric + "_stderr") or 0 for r in with_value]},
            name=metric.removeprefix("lm_eval.")))
    figure.update_layout(title=_title("Downstream tasks (lm-eval)" if metrics else "Downstream tasks: none in this run", run),
                         barmode="group", yaxis_title="score")
    return figure


# name -> (UI label, builder, whether this run has data for it). The UI shows every chart (empty ones
# stay empty); the HTML report leaves out charts without data.
CHART_SPECS: dict[str, tuple[str, Any, Any]] = {
    "size_vs_perplexity": ("Size vs perplexity", size_vs_perplexity, lambda run: True),
    "memory": ("Memory", memory, lambda run: True),
    "latency": ("Latency", latency, lambda run: True),
    "sparsity": ("Sparsity", sparsity_heatmap, lambda run: True),
    "divergence": ("Divergence", divergence, lambda run: True),
    "downstream": ("Downstream tasks (lm-eval)", downstream_tasks,
                   lambda run: any(m.startswith("lm_eval.") for r in _ok(run) for m in r["metrics"])),
    "sensitivity": ("Per-block sensitivity", sensitivity, lambda run: bool((run.get("sensitivity") or {}).get("rows"))),
    "calibration_spread": ("Calibration robustness", calibration_spread, lambda run: _has_calibration_groups(run)),
}
CHARTS = {name: spec[1] for name, spec in CHART_SPECS.items()}
CHART_LABELS = [spec[0] for spec in CHART_SPECS.values()]


def _has_calibration_groups(run: dict[str, Any]) -> bool:
    from workbench.robustness import calibration_groups

    return bool(calibration_groups(run))


def all_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The charts this run has data for (the HTML report's set)."""
    return {name: build(run) for name, (_label, build, has_data) in CHART_SPECS.items() if has_data(run)}
