"""Tables and exports of a run's records: a readable table for the terminal, CSV and JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.data.validity import display_status, flags_text

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
    ("KLD p99", "kld_p99", 1.0),
    ("RMS Δp", "delta_p_rms", 1.0),
    ("top-1", "top1_agreement", 1.0),
)
PPL_RATIO_TITLE = "ppl ratio [95% CI]"
INDISTINGUISHABLE_MARK = "≈"
INDISTINGUISHABLE_TEXT = "not distinguishable from the baseline on this text"
# lm-eval figures left out of the table (they are in CSV / JSON): errors, gain / loss shares, paired item counts.
TABLE_LM_EVAL_HIDDEN = ("_stderr", ".flips_gain", ".flips_loss", ".paired_items")


def ppl_ratio_text(metrics: dict[str, Any], is_baseline: bool = False) -> str | None:
    """'1.0123 [1.0040, 1.0207]', marked when the paired interval contains 1 (metrics/quality.py).

    The baseline's own interval (its second pass against its first) is not marked: that is a determinism check.
    """
    ratio, interval = metrics.get("ppl_ratio"), metrics.get("ppl_ratio_ci95")
    if ratio is None:
        return None
    if not interval:
        return f"{ratio:.4f}"
    text = f"{ratio:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"
    return f"{text} {INDISTINGUISHABLE_MARK}" if metrics.get("ppl_indistinguishable") and not is_baseline else text


def _is_baseline(run: dict[str, Any], record: dict[str, Any]) -> bool:
    return record["name"] == (run.get("preset") or {}).get("baseline")


def table_legend(run: dict[str, Any]) -> str:
    """The footnote for the perplexity-ratio mark, when a variant carries it."""
    if not any(r["metrics"].get("ppl_indistinguishable") and not _is_baseline(run, r) for r in run["variants"]):
        return ""
    return (f"{INDISTINGUISHABLE_MARK} {INDISTINGUISHABLE_TEXT}: the 95 % paired interval of its perplexity ratio "
            "to the baseline (per-window NLL differences) contains 1.")


def _interval(bounds: Any, scale: float) -> str | None:
    """'low–high' of a 95 % interval (metrics.*_ci95), or None for records without one."""
    if not bounds or bounds[0] is None:
        return None
    return f"{bounds[0] * scale:.4g}–{bounds[1] * scale:.4g}"


def summary_table(run: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for record in run["variants"]:
        row: dict[str, Any] = {"variant": record["name"], "method": record["method"], "status": display_status(record)}
        metrics = record["metrics"]
        for title, metric, scale in TABLE_COLUMNS:
            value = metrics.get(metric)
            row[title] = None if value is None else value * scale
            if metric == "perplexity":
                row[PPL_RATIO_TITLE] = ppl_ratio_text(record["metrics"], _is_baseline(run, record))
            if metric in ("ttft_s", "decode_tok_s"):  # each speed figure with its 95 % interval beside it
                row[f"{title} 95% CI"] = _interval(metrics.get(f"{metric}_ci95"), scale)
            if metric == "decode_tok_s":  # how much to trust the speed columns (metrics/latency.py)
                row["repeats"] = metrics.get("latency_repeats")
                row["other cores"] = metrics.get("contention")
                noisy = metrics.get("speed_noisy")
                row["speed noisy"] = None if noisy is None else ("NOISY" if noisy else "no")
        if record.get("interleaved"):  # the paired ratio from the round-robin pass (speedpass.py)
            row["decode x baseline"] = record["interleaved"]["decode_ratio"]
            row["x baseline 95% CI"] = _interval(record["interleaved"]["decode_ratio_ci95"], 1.0)
        if record.get("gguf"):  # the file's real mix, not its nominal type
            row["bits/w"] = record["gguf"]["bits_per_weight"]
        if record.get("roofline"):  # decode speed against this machine's memory-bandwidth limit (roofline.py)
            row["decode limit tok/s"] = record["roofline"]["decode_tok_s_limit"]
            row["of limit"] = record["roofline"]["fraction"]
        for metric, value in record["metrics"].items():  # downstream tasks, e.g. lm_eval.pydoc_lastword.acc
            if metric.startswith("lm_eval.") and not metric.endswith(TABLE_LM_EVAL_HIDDEN):
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
    text = cells.to_string(index=False)
    legend = table_legend(run)
    return f"{text}\n{legend}" if legend else text


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
        f"{protocol['warmup']} warm-up run(s), then the {_repeats_text(protocol)}. Peak RSS: {protocol['peak_rss']}."
        + tokenization_summary(protocol) + _reuse_text(run)
    )


def _reuse_text(run: dict[str, Any]) -> str:
    """Which variants' figures come from an earlier run (measure_cache.py), so nobody reads them as new."""
    reused = [(r["name"], r["reused"]) for r in run["variants"] if r.get("reused")]
    if not reused:
        return ""
    return " Reused, nothing that shaped them having changed: " + "; ".join(
        f"{name}: {info['figures']} figures from run {info['run_id']}" for name, info in reused) + "."


def _repeats_text(protocol: dict[str, Any]) -> str:
    if "latency_ci95" not in protocol:  # runs from before the speed intervals
        return f"median of {protocol['repeats']}"
    text = (f"median of {protocol['latency_repeats']} ('repeats' per variant), with a {protocol['latency_ci95']} "
            f"('95% CI'); 'other cores': {protocol['contention']}; 'speed noisy': {protocol['speed_noisy']}")
    if protocol.get("interleave"):
        text += f"; 'decode x baseline': {protocol['interleave']}"
    return text


def speed_note(run: dict[str, Any]) -> str | None:
    """One line naming the variants whose speed figures are noise, so nobody compares them unawares."""
    noisy = [r["name"] for r in run["variants"] if r["metrics"].get("speed_noisy")]
    if not noisy:
        return None
    return (f"Speed figures flagged NOISY: {', '.join(noisy)} (a 95 % interval reaches beyond +-10 % of its median, "
            "or other processes used more than 0.25 core while they were timed); compare their speeds with care.")


def tokenization_summary(protocol: dict[str, Any]) -> str:
    """BOS policy and tokenizer checks (validity.py); runs recorded before these checks have none."""
    if "bos" not in protocol:
        return ""
    agreement = protocol.get("tokenizer_agreement")
    checked = (f"; the GGUF file's own tokenizer reproduces {agreement['matching_fraction']:.1%} of the scored ids"
               if agreement and agreement.get("matching_fraction") is not None else "")
    return (f" Tokens: {protocol['bos_detail']}; {protocol['chars_per_token']:.2f} characters per token{checked}; "
            f"unigram perplexity of the scored ids {protocol['unigram_perplexity']:.4g} (a baseline above it is flagged).")


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
    legend = table_legend(run)
    return "\n".join([header, rule, *rows, *(["", legend] if legend else [])])


# (column title, metric name) of the fidelity table: the llama.cpp --kl-divergence set with its errors.
FIDELITY_COLUMNS = (
    ("KLD mean", "kld_mean"), ("KLD ± err", "kld_mean_stderr"), ("median", "kld_median"), ("p90", "kld_p90"),
    ("p95", "kld_p95"), ("p99", "kld_p99"), ("p99.9", "kld_p999"), ("max", "kld_max"),
    ("Δp mean", "delta_p_mean"), ("Δp ± err", "delta_p_mean_stderr"), ("RMS Δp", "delta_p_rms"),
    ("Δp p01", "delta_p_p01"), ("Δp p05", "delta_p_p05"), ("Δp p50", "delta_p_p50"), ("Δp p95", "delta_p_p95"),
    ("Δp p99", "delta_p_p99"), ("same top", "top1_agreement"), ("ln PPL ratio", "ln_ppl_ratio_mean"),
    ("ln ratio ± err", "ln_ppl_ratio_stderr"), ("cor ln PPL", "ln_ppl_correlation"),
    ("same output", "samples_exact_match"), ("first diff", "samples_first_diff_mean"),
)


def fidelity_table(run: dict[str, Any]) -> pd.DataFrame:
    """Per variant, the divergence statistics, the perplexity-ratio interval and the generation agreement."""
    rows = []
    for record in run["variants"]:
        m = record["metrics"]
        row: dict[str, Any] = {"variant": record["name"]}
        row.update({title: m.get(metric) for title, metric in FIDELITY_COLUMNS})
        row[PPL_RATIO_TITLE] = ppl_ratio_text(m, _is_baseline(run, record))
        rows.append(row)
    return pd.DataFrame(rows)


def flips_table(run: dict[str, Any]) -> pd.DataFrame:
    """One row per variant and lm-eval task: accuracy, recovery, flips (gains / losses) and McNemar's p."""
    rows = []
    for record in run["variants"]:
        m = record["metrics"]
        tasks = sorted({k.split(".")[1] for k in m if k.startswith("lm_eval.") and k.endswith(".flips")})
        for task in tasks:
            prefix = f"lm_eval.{task}."
            rows.append({"variant": record["name"], "task": task, "acc": m.get(prefix + "acc"),
                         "recovery %": m.get(prefix + "recovery"), "flips": m.get(prefix + "flips"),
                         "gains": m.get(prefix + "flips_gain"), "losses": m.get(prefix + "flips_loss"),
                         "McNemar p": m.get(prefix + "mcnemar_p"), "items": m.get(prefix + "paired_items")})
    return pd.DataFrame(rows)


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

    from workbench.views.plots import all_figures

    from workbench.analysis.robustness import calibration_groups, robustness_text

    from workbench.views.plots import FIDELITY_CHARTS

    figures = all_figures(run)
    groups = calibration_groups(run)
    spread = f"<pre>{html.escape(robustness_text(groups))}</pre>" if groups else ""
    rendered = {name: figure.to_html(full_html=False, include_plotlyjs=(index == 0))
                for index, (name, figure) in enumerate(figures.items())}
    parts = [part for name, part in rendered.items() if name not in FIDELITY_CHARTS]
    table_format = {"index": False, "na_rep": "—", "float_format": lambda v: f"{v:.4g}"}
    flips = flips_table(run)
    fidelity = (
        "<h2>Fidelity</h2><p>Divergence from the baseline on the scored tokens (llama.cpp's "
        "<code>--kl-divergence</code> statistics; percentiles interpolate linearly between ranks), the paired "
        "perplexity-ratio interval, and how often the greedy sample outputs equal the baseline's.</p>"
        f"{fidelity_table(run).to_html(**table_format)}"
        + (f"<p>Flips per lm-eval task (items whose correctness differs from the baseline's; McNemar's paired "
           f"test):</p>{flips.to_html(**table_format)}" if not flips.empty else "")
        + "".join(rendered[name] for name in FIDELITY_CHARTS if name in rendered)
    )
    legend = f"<p>{html.escape(table_legend(run))}</p>" if table_legend(run) else ""
    note = f"<p><b>Note:</b> {html.escape(run['model']['note'])}</p>" if run["model"].get("note") else ""
    flagged = flags_text(run)
    if flagged:
        note += f"<pre style='color:#a40'>{html.escape(flagged)}</pre>"
    if speed_note(run):
        note += f"<p><b>Speed:</b> {html.escape(speed_note(run) or '')}</p>"
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Squeeze Bench run {run['run_id']}</title></head>"
        f"<body><h1>Squeeze Bench: {html.escape(run['preset']['name'])} on {html.escape(run['model']['source'])}</h1>"
        f"<p>run {run['run_id']}, {run['created_at']}</p>{note}"
        f"{summary_table(run).to_html(index=False, na_rep='—', float_format=lambda v: f'{v:.4g}')}{legend}"
        f"<p>{html.escape(protocol_summary(run))}</p>{spread}{''.join(parts)}{fidelity}</body></html>"
    )
    Path(path).write_text(document, encoding="utf-8")
