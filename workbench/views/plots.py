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
    # Mixed precision chosen under a budget (gguf-auto, bnb-auto) is marked apart from uniform types.
    auto = [bool((r.get("gguf") or {}).get("auto") or (r.get("bnb") or {}).get("auto")) for r in records]
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


def _error_bars(m: list[dict[str, Any]], metric: str, scale: float) -> dict[str, Any]:
    """Asymmetric bars: the median's 95 % interval where the record has one, else min-max (older runs)."""
    def bounds(x: dict[str, Any]) -> tuple[float, float]:
        ci = x.get(f"{metric}_ci95")
        return (ci[0], ci[1]) if ci and ci[0] is not None else (x[f"{metric}_min"], x[f"{metric}_max"])

    return {"type": "data", "symmetric": False, "array": [(bounds(x)[1] - x[metric]) * scale for x in m],
            "arrayminus": [(x[metric] - bounds(x)[0]) * scale for x in m]}


def latency(run: dict[str, Any]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = _ok(run)
    names = [r["name"] for r in records]
    m = [r["metrics"] for r in records]
    # Noisy speed figures are hatched and labelled, so a bar that is noise does not pass for a result.
    noisy = [bool(x.get("speed_noisy")) for x in m]
    pattern = {"shape": ["/" if n else "" for n in noisy]}
    labels = ["NOISY" if n else "" for n in noisy]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("time to first token (ms)", "decode tok/s"))
    figure.add_trace(go.Bar(x=names, y=[x["ttft_s"] * 1000 for x in m], name="TTFT ms", error_y=_error_bars(m, "ttft_s", 1000.0),
                            marker={"pattern": pattern}, text=labels, textposition="inside"), row=1, col=1)
    figure.add_trace(go.Bar(x=names, y=[x["decode_tok_s"] for x in m], name="decode tok/s",
                            error_y=_error_bars(m, "decode_tok_s", 1.0), marker={"pattern": pattern}, text=labels,
                            textposition="inside"), row=1, col=2)
    roof = [(r["name"], r["roofline"]) for r in records if (r.get("roofline") or {}).get("decode_tok_s_limit")]
    if roof:  # the memory-bandwidth limit of each variant's decode speed (roofline.py)
        figure.add_trace(go.Scatter(
            x=[n for n, _ in roof], y=[x["decode_tok_s_limit"] for _, x in roof], mode="markers+text",
            name="bandwidth limit", marker={"symbol": "line-ew-open", "size": 28, "line": {"width": 3}},
            text=[f"limit {x['decode_tok_s_limit']:.0f}" + (f" ({x['fraction']:.0%})" if x["fraction"] else "")
                  for _, x in roof], textposition="top center"), row=1, col=2)
    with_ci = any(x.get("decode_tok_s_ci95") for x in m)
    figure.update_layout(title=_title("Latency (median, " + ("95 % interval bars; hatched: NOISY)" if with_ci
                                                             else "min-max bars)"), run), showlegend=False)
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

    from workbench.analysis.robustness import calibration_groups

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


KLD_POINTS = (("median", "kld_median"), ("p90", "kld_p90"), ("p95", "kld_p95"), ("p99", "kld_p99"),
              ("p99.9", "kld_p999"), ("max", "kld_max"))


def fidelity(run: dict[str, Any]):
    """KLD percentiles per variant (log scale) and the spread of Δp (box 5-95 %, whiskers 1-99 %, line = median)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = [r for r in _ok(run) if r["metrics"].get("kld_median") is not None]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("KLD percentiles (log scale)",
                                                           "Δp of the correct token: box 5-95 %, whiskers 1-99 %"))
    for record in records:
        m = record["metrics"]
        figure.add_trace(go.Scatter(x=[label for label, _ in KLD_POINTS], y=[m[key] for _, key in KLD_POINTS],
                                    mode="lines+markers", name=record["name"], legendgroup=record["name"]), row=1, col=1)
        figure.add_trace(go.Box(x=[record["name"]], lowerfence=[m["delta_p_p01"]], q1=[m["delta_p_p05"]],
                                median=[m["delta_p_p50"]], q3=[m["delta_p_p95"]], upperfence=[m["delta_p_p99"]],
                                mean=[m["delta_p_mean"]], name=record["name"], legendgroup=record["name"],
                                showlegend=False), row=1, col=2)
    figure.update_yaxes(type="log", title_text="KLD (nats)", row=1, col=1)
    figure.update_yaxes(title_text="p(variant) - p(baseline)", row=1, col=2)
    figure.update_layout(title=_title(f"Fidelity to {run['preset']['baseline']}: KLD and Δp distributions", run))
    return figure


def flips(run: dict[str, Any]):
    """Share of lm-eval items whose correctness differs from the baseline's, per task: losses and gains."""
    import plotly.graph_objects as go

    records = _ok(run)
    tasks = sorted({k.split(".")[1] for r in records for k, v in r["metrics"].items()
                    if k.startswith("lm_eval.") and k.endswith(".flips") and v is not None})
    figure = go.Figure()
    for task in tasks:
        prefix = f"lm_eval.{task}."
        with_value = [r for r in records if r["metrics"].get(prefix + "flips") is not None]
        names = [r["name"] for r in with_value]
        for part, label in (("flips_loss", "lost"), ("flips_gain", "gained")):
            figure.add_trace(go.Bar(
                x=names, y=[r["metrics"][prefix + part] for r in with_value], name=f"{task}: {label}",
                offsetgroup=task, text=[f"p={r['metrics'][prefix + 'mcnemar_p']:.2g}" if part == "flips_gain" else ""
                                        for r in with_value], textposition="outside"))
    figure.update_layout(title=_title("Flips per lm-eval task (share of items; McNemar p above)" if tasks
                                      else "Flips: no lm-eval tasks in this run", run),
                         barmode="relative", yaxis_title="share of items")
    return figure


# name -> (UI label, builder, whether this run has data for it). The UI and the HTML report show only the charts
# a run has data for, so neither shows an empty box.
CHART_SPECS: dict[str, tuple[str, Any, Any]] = {
    "size_vs_perplexity": ("Size vs perplexity", size_vs_perplexity,
                           lambda run: any(r["metrics"].get("perplexity") is not None and r["metrics"].get("disk_bytes")
                                           for r in _ok(run))),
    "memory": ("Memory", memory, lambda run: any(r["metrics"].get("weight_bytes") is not None
                                                 or r["metrics"].get("peak_rss_bytes") is not None for r in _ok(run))),
    "latency": ("Latency", latency, lambda run: bool(_ok(run)) and all(r["metrics"].get("ttft_s") is not None
                                                                     and r["metrics"].get("decode_tok_s") is not None
                                                                     for r in _ok(run))),
    "sparsity": ("Sparsity", sparsity_heatmap, lambda run: any(r.get("layers") for r in _ok(run))),
    "divergence": ("Divergence", divergence, lambda run: any(r["metrics"].get("kld_mean") is not None for r in _ok(run))),
    "downstream": ("Downstream tasks (lm-eval)", downstream_tasks,
                   lambda run: any(m.startswith("lm_eval.") for r in _ok(run) for m in r["metrics"])),
    "sensitivity": ("Per-block sensitivity", sensitivity, lambda run: bool((run.get("sensitivity") or {}).get("rows"))),
    "calibration_spread": ("Calibration robustness", calibration_spread, lambda run: _has_calibration_groups(run)),
    "fidelity": ("Fidelity: KLD and Δp", fidelity,
                 lambda run: any(r["metrics"].get("kld_median") is not None for r in _ok(run))),
    "flips": ("Fidelity: flips per task", flips,
              lambda run: any(k.endswith(".flips") and v is not None for r in _ok(run) for k, v in r["metrics"].items())),
}
FIDELITY_CHARTS = ("fidelity", "flips")  # the HTML report puts these in its Fidelity section
CHARTS = {name: spec[1] for name, spec in CHART_SPECS.items()}
CHART_LABELS = [spec[0] for spec in CHART_SPECS.values()]


def _has_calibration_groups(run: dict[str, Any]) -> bool:
    from workbench.analysis.robustness import calibration_groups

    return bool(calibration_groups(run))


def all_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The charts this run has data for (the HTML report's set)."""
    return {name: build(run) for name, (_label, build, has_data) in CHART_SPECS.items() if has_data(run)}


GREY = "lightgrey"
OVER_BUDGET_OPACITY = 0.3


def grey_over_budget(figure: Any, over: set[str]) -> Any:
    """Grey the points and bars of the variants in `over` (peak memory above a "fits in N GB" budget), in place.

    A point belongs to a variant when its x is the variant's name (bar charts) or its text label starts with it
    (the size chart's "name [honesty]" labels). Traces without such points are left as they are."""
    for trace in figure.data:
        if trace.type == "bar" and trace.x is not None:
            names = [str(x) for x in trace.x]
        elif trace.type == "scatter" and trace.name == "variants" and trace.text is not None:
            names = [str(label).split(" [")[0] for label in trace.text]
        else:
            continue  # lines, limits and heatmaps have no per-variant points
        hidden = [name in over for name in names]
        trace.marker.opacity = [OVER_BUDGET_OPACITY if h else 1.0 for h in hidden]
        if trace.type == "scatter":  # the size chart's points: grey, not only faint, so they read as "does not fit"
            trace.marker.color = [GREY if h else "royalblue" for h in hidden]
    return figure


def plan_chart(plans: Sequence[dict[str, Any]], budget_gb: float | None = None):
    """The planner's estimated weights and peak memory per variant (before a run), with the budget as a line."""
    import plotly.graph_objects as go

    names = [p["name"] for p in plans]
    figure = go.Figure([
        go.Bar(name="est. weights MB", x=names, y=[p["weight_bytes"] / MB for p in plans]),
        go.Bar(name="est. peak MB", x=names, y=[None if p["peak_bytes"] is None else p["peak_bytes"] / MB for p in plans]),
    ])
    if budget_gb:
        figure.add_hline(y=budget_gb * 1e9 / MB, line_dash="dash", annotation_text=f"fits in {budget_gb:g} GB")
    figure.update_layout(barmode="group", title="Plan: estimated memory per variant (before anything loads)",
                         yaxis_title="MB")
    return figure
