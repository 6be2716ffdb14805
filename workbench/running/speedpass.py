"""The interleaved speed pass: after every variant is measured, time them again side by side.

Design (simpler than one worker per variant, and said so in the protocol): one worker process loads
every variant that measured ok, pins its threads like the measuring worker, and times one repeat of
each per round in a fixed order (A B C A B C ...; metrics/latency.py `interleaved_latency`). Drift
and background load then hit all variants of a round alike, so each variant's decode and TTFT ratio
to the baseline is computed per round and reported as the median over rounds with a 95 % paired
(order-statistic) interval. The variants share one process, its allocator and its thread pools,
which the sequential pass (one fresh process each) does not; the sequential figures stay the
record's metrics, the pass adds `interleaved` to each record.

It runs when `latency.interleave` is not false and the variants fit in memory together: the sum of
their measured peak RSS (each includes its own runtime's start-up memory, so this overestimates one
shared process) within 70 % of the memory available now. Otherwise the protocol line says why not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

FIT_FRACTION = 0.7  # of the memory available now; the rest is headroom for the pass's own buffers


def speed_pass_worker(payload: dict, emit: Callable[[str], None]) -> dict:
    """Worker entry: load every variant, time them round-robin, return `interleaved_latency`'s result."""
    from workbench.metrics.latency import interleaved_latency, pin_threads

    spec = payload["latency"]
    pinned = pin_threads(payload["threads"]) if spec.get("pin_threads", True) else None
    import torch

    from workbench.runtimes import load_variant
    from workbench.runtimes.torch import pick_device

    torch.set_num_threads(payload["threads"])
    device = pick_device(payload["device"])
    prompt = json.loads(Path(payload["eval_tokens_path"]).read_text())[: spec["prompt_tokens"]]
    loaded: dict[str, Any] = {}
    try:
        for variant in payload["variants"]:
            emit(f"loading {variant['name']}")
            loaded[variant["name"]] = load_variant(variant["runtime"], name=variant["name"],
                                                   artifact_path=Path(variant["artifact_path"]), device=device,
                                                   threads=payload["threads"],
                                                   trust_remote_code=payload["trust_remote_code"],
                                                   n_ctx=spec["prompt_tokens"] + spec["new_tokens"] + 8)
        emit(f"timing {len(loaded)} variants round-robin")
        result = interleaved_latency({name: v.generate for name, v in loaded.items()}, payload["baseline"], prompt,
                                     spec["new_tokens"], spec["warmup"], spec["repeats"], target_ci=spec.get("target_ci"),
                                     max_seconds=spec.get("max_seconds", 60.0), max_repeats=spec.get("max_repeats", 500))
    finally:
        for variant in loaded.values():
            variant.close()
    result["pinned_cpus"] = pinned
    return result


def available_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        return None


def fits_together(records: list[dict], available: int | None) -> tuple[bool, str]:
    """Whether one process can hold every variant at once, and the figures that decided it."""
    peaks = [r["metrics"].get("peak_rss_bytes") for r in records]
    if available is None or any(p is None for p in peaks):
        return False, "the memory available or a variant's peak RSS is unknown"
    need = sum(peaks)
    text = (f"sum of measured peak RSS {need / 1e9:.2f} GB vs {FIT_FRACTION:.0%} of the "
            f"{available / 1e9:.2f} GB available")
    return need <= FIT_FRACTION * available, text


def interleaved_pass(runner: Any, records: dict[int, dict], run: dict[str, Any]) -> bool:
    """Run the pass for a finished run; True when records gained `interleaved` (so they are stored again)."""
    preset = runner.preset
    mode = preset.latency.interleave
    protocol = run["protocol"]
    if mode is False:
        protocol["interleave"] = "off (latency.interleave: false): sequential pass only"
        return False
    ok = [r for _, r in sorted(records.items()) if r["status"] == "ok"]
    if preset.baseline not in {r["name"] for r in ok} or len(ok) < 2:
        protocol["interleave"] = "not run: it needs the baseline and another variant measured ok; sequential pass only"
        return False
    fits, why = fits_together(ok, available_memory_bytes())
    if not fits:
        protocol["interleave"] = f"sequential pass only: the variants do not fit in memory together ({why})"
        return False
    payload = {"threads": preset.threads, "device": preset.device, "trust_remote_code": preset.trust_remote_code,
               "latency": preset.latency.model_dump(), "baseline": preset.baseline,
               "eval_tokens_path": str(runner.out_dir / "eval_tokens.json"),
               "variants": [{"name": r["name"], "runtime": r["runtime"]["name"], "artifact_path": r["artifact_path"]}
                            for r in ok]}
    outcome = runner._worker("workbench.running.speedpass:speed_pass_worker", payload, "interleaved", None, "measuring", -1)
    if not outcome.ok:
        protocol["interleave"] = f"failed ({outcome.error}); sequential pass only"
        return False
    result = outcome.result
    for record in ok:
        record["interleaved"] = {**result["variants"][record["name"]], "rounds": result["rounds"], "stop": result["stop"]}
    protocol["interleave"] = (
        f"interleaved pass ({why}): {len(ok)} variants loaded in one worker process (threads pinned to "
        f"{result['pinned_cpus']}), one repeat each per round in the order {' '.join(result['order'])}, "
        f"{result['rounds']} rounds (stopped by {result['stop']}); decode and TTFT ratios to {preset.baseline} are "
        "medians of per-round ratios with 95 % paired order-statistic intervals")
    return True
