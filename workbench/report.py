"""Tables and exports of a run's records: a readable table for the terminal, CSV and JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

MB = 1e6

# (column title, metric name, scale) for the terminal table; units are in the titles.
TABLE_COLUMNS = (
    ("disk MB", "disk_bytes", 1 / MB),
    ("weights MB", "weight_bytes", 1 / MB),
    ("peak RSS MB", "peak_rss_bytes", 1 / MB),
    ("load s", "load_s", 1.0),
    ("TTFT ms", "ttft_s", 1000.0),
    ("prefill tok/s", "prefill_tok_s", 1.0),
    ("decode tok/s", "decode_tok_s", 1.0),
    ("sparsity", "sparsity", 1.0),
    ("perplexity", "perplexity", 1.0),
    ("KLD", "kld_mean", 1.0),
    ("top-1", "top1_agreement", 1.0),
)


def summary_table(run: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for record in run["variants"]:
        row: dict[str, Any] = {"variant": record["name"], "method": record["method"], "status": record["status"]}
        for title, metric, scale in TABLE_COLUMNS:
            value = record["metrics"].get(metric)
            row[title] = None if value is None else value * scale
        if record.get("gguf"):  # the file's real mix, not its nominal type
            row["bits/w"] = record["gguf"]["bits_per_weight"]
        if record.get("roofline"):  # decode speed against this machine's memory-bandwidth limit (roofline.py)
            row["decode limit tok/s"] = record["roofline"]["decode_tok_s_limit"]
            row["of limit"] = record["roofline"]["fraction"]
        for metric, value in record["metrics"].items():  # downstream tasks, e.g. lm_eval.pydoc_lastword.acc
            if metric.startswith("lm_eval.") and not metric.endswith("_stderr"):
                row[metric.removeprefix("lm_eval.")] = value
        row["honesty"] = record.get("honesty")
        row["error"] = record.get("error") or ""
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(run: dict[str, Any]) -> str:
    table = summary_table(run)
    if not table["error"].astype(bool).any():
        table = table.drop(columns="error")
    # Cells formatted here, not by pandas: a column that is all None (every variant failed) has object
    # dtype, where na_rep does not apply and pandas would print "None".
    cells = table.astype(object).map(_cell)
    return cells.to_string(index=False)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def flat_records(run: dict[str, Any]) -> pd.DataFrame:
    """One row per variant with every metric under its contract name (for CSV)."""
    rows = []
    for record in run["variants"]:
        row = {"run_id": run["run_id"], "model": run["model"]["source"], "variant": record["name"],
               "method": record["method"], "status": record["status"], "error": record.get("error"),
               "honesty": record.get("honesty"), "options": json.dumps(record.get("options", {}))}
        row.update(record["metrics"])
        for group in ("estimate", "roofline"):  # planner estimate and decode roofline, beside the metrics
            for key, value in (record.get(group) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[f"{group}.{key}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def export_csv(run: dict[str, Any], path: Path) -> None:
    flat_records(run).to_csv(path, index=False)


def export_json(run: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(run, indent=1))


def protocol_summary(run: dict[str, Any]) -> str:
    """One paragraph saying how every figure in the table was measured."""
    env, protocol = run["environment"], run["protocol"]
    return (
        f"Measured on {env['cpu']} ({env['device']}, {env['threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}. Perplexity/KLD: "
        f"{protocol['scored_tokens']} scored tokens of {protocol['eval_tokens']} ({protocol['eval_text']}), "
        f"context {protocol['context']}, stride {protocol['stride']}, scored '{protocol['scored']}'. "
        f"Latency: {protocol['prompt_tokens']}-token prompt, {protocol['new_tokens']} greedy tokens, "
        f"median of {protocol['repeats']} after {protocol['warmup']} warm-up. Peak RSS: {protocol['peak_rss']}."
    )


def budget_verdict(run: dict[str, Any]) -> str:
    """The memory-budget verdict of a run, for after its table (the CLI) and the app's note."""
    budget = run.get("memory_budget_gb") or (run.get("preset") or {}).get("memory_budget_gb")
    if not budget:
        return ""
    over = run.get("over_budget")
    if over is None:
        return f"memory budget {budget:g} GB: not checked (no estimates for this run)"
    if not over:
        return f"memory budget {budget:g} GB: every variant's estimated peak fits"
    return f"memory budget {budget:g} GB: {len(over)} variant(s) over budget\n" + "\n".join(f"  over budget: {w}" for w in over)


def markdown_table(run: dict[str, Any]) -> str:
    table = summary_table(run).drop(columns="error")
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join("—" if pd.isna(v) else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def sensitivity_text(sensitivity: dict[str, Any]) -> str:
    """The per-block table and, where the method allows it, the mixed-precision variant it suggests."""
    if sensitivity.get("error"):
        return f"sensitivity of {sensitivity['variant']}: not measured ({sensitivity['error']})"
    table = pd.DataFrame(sensitivity["rows"])[["name", "kld_mean", "kld_p99", "top1_agreement", "perplexity"]]
    lines = [f"per-block sensitivity of {sensitivity['variant']} ({sensitivity['protocol']}, "
             f"{sensitivity['eval_tokens']} eval tokens):", table.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    if sensitivity.get("mixed_precision_variant"):
        import yaml

        lines.append("mixed-precision variant keeping the most sensitive blocks (add it to the preset):")
        lines.append(yaml.safe_dump([sensitivity["mixed_precision_variant"]], sort_keys=False, default_flow_style=None))
    return "\n".join(lines)


def export_html(run: dict[str, Any], path: Path) -> None:
    """A standalone report: table, protocol and every chart, with plotly.js embedded (opens offline)."""
    import html

    from workbench.plots import all_figures

    from workbench.robustness import calibration_groups, robustness_text

    figures = all_figures(run)
    groups = calibration_groups(run)
    spread = f"<pre>{html.escape(robustness_text(groups))}</pre>" if groups else ""
    parts = [figure.to_html(full_html=False, include_plotlyjs=(index == 0)) for index, figure in enumerate(figures.values())]
    note = f"<p><b>Note:</b> {html.escape(run['model']['note'])}</p>" if run["model"].get("note") else ""
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Squeeze Bench run {run['run_id']}</title></head>"
        f"<body><h1>Squeeze Bench: {html.escape(run['preset']['name'])} on {html.escape(run['model']['source'])}</h1>"
        f"<p>run {run['run_id']}, {run['created_at']}</p>{note}"
        f"{summary_table(run).to_html(index=False, na_rep='—', float_format=lambda v: f'{v:.4g}')}"
        f"<p>{html.escape(protocol_summary(run))}</p>{spread}{''.join(parts)}</body></html>"
    )
    Path(path).write_text(document, encoding="utf-8")
