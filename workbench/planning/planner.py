"""Budget planner: each variant's weight memory and build/measure time, estimated before anything loads.

    python -m workbench plan presets/quickstart.yaml [--memory-budget-gb 1.5]

Weights: the parameter count from the model's config (or GGUF metadata) times the bits per weight
of the variant's format, with each format's real overheads (bitsandbytes row scales and 4-bit absmax
blocks, the llama.cpp tensor-type mix via `gguf_plan`). Time: this machine's measured matmul speed
and memory bandwidth (`planning/machine.py`) scaled by FLOPs and bytes per token of each
protocol step, with per-format efficiencies fitted on quickstart runs. The weight figure is
usually within a few percent; the time figure is a rough guide (expect +-50 %, more on a busy
machine). Every run stores the estimate beside the measured figures so the error stays visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.planning.modelshape import ModelShape
from workbench.methods.base import DTYPE_BYTES, BuildSpeed
from workbench.planning.weightsize import WeightEstimate, estimate_weights, stage_methods

# Forward throughput relative to the calibrated 1024^3 float32 matmul (prefill, perplexity windows), and
# the fixed cost per decoder layer of one decode step (python, dispatch, dequantization), per format family.
# Fitted on quickstart runs on a 2-core AVX-512 EPYC (README table and the report of this module's issue).
PREFILL_EFFICIENCY = {"float32": 1.0, "bfloat16": 2.0, "float16": 0.05, "bnb-int8": 1.1, "bnb-4bit": 1.2, "gguf": 1.0}
DECODE_LAYER_S = {"float32": 0.0008, "bfloat16": 0.0008, "float16": 0.004, "bnb-int8": 0.002, "bnb-4bit": 0.00095,
                  "gguf": 0.0001}
# Peak resident memory above the imports and the weights (load transients, activations, logits, llama.cpp's
# compute buffers and KV cache), per format family, from the quickstart runs' peak RSS.
PEAK_EXTRA_BYTES = {"float32": 330e6, "bfloat16": 330e6, "float16": 330e6, "bnb-int8": 420e6, "bnb-4bit": 420e6,
                    "gguf": 360e6}
DISK_BYTES_S = 1.0e9  # reading and writing safetensors (page cache helps; a rough middle)


# ---- time and peak memory ---------------------------------------------------------------------------------


@dataclass
class VariantPlan:
    name: str
    method: str
    format: str
    weight_bytes: int
    peak_bytes: int | None
    build_s: float | None
    measure_s: float | None
    cached: bool
    notes: list[str]

    @property
    def time_s(self) -> float | None:
        if self.measure_s is None:
            return None
        return self.measure_s + (0.0 if self.cached else (self.build_s or 0.0))

    def record(self) -> dict[str, Any]:
        """The record's `estimate` field (beside `metrics`)."""
        return {"weight_bytes": self.weight_bytes, "time_s": self.time_s, "build_s": self.build_s,
                "measure_s": self.measure_s, "peak_bytes": self.peak_bytes, "format": self.format,
                "build_cached": self.cached, "notes": self.notes}


def estimate_measure_s(est: WeightEstimate, protocol: dict[str, Any], profile: dict[str, Any], is_baseline: bool) -> float:
    """Seconds of one measuring worker: start-up, load, latency runs, samples, perplexity passes, sparsity."""
    shape = est.shape
    flops_s = profile["matmul"]["flops_s"] * PREFILL_EFFICIENCY.get(est.family, 1.0)
    bandwidth = profile["bandwidth"]["bandwidth_bytes_s"]
    flops_per_token = 2 * (shape.linear_params() + shape.vocab * shape.hidden)  # the head runs even when tied
    overhead = DECODE_LAYER_S.get(est.family, 0.001) * shape.layers  # per forward call
    prefill = lambda n: n * flops_per_token / flops_s + overhead  # noqa: E731
    from workbench.planning.roofline import bytes_per_token

    read = {"embedding_bytes": est.embedding_bytes, "embedding_rows": shape.vocab, "tied": shape.tied}
    per_token = bytes_per_token(est.weight_bytes, read) / bandwidth + overhead  # decode: weights streamed once
    lat = protocol["latency"]
    # Adaptive repeats run at least 6 (the first count with a 95 % interval); more on a noisy machine.
    repeats = max(lat["repeats"], 6) if lat.get("target_ci") else lat["repeats"]
    latency = (lat["warmup"] + repeats) * (prefill(lat["prompt_tokens"]) + (lat["new_tokens"] - 1) * per_token)
    samples = protocol["sample_prompts"] * (prefill(30) + protocol["sample_tokens"] * per_token)
    tokens = protocol["eval_tokens"]
    windows = max(1, math.ceil(tokens / protocol["stride"]))
    window_s = prefill(protocol["context"]) + protocol["context"] * shape.vocab * 6e-9  # float64 log-softmax
    perplexity = windows * window_s * (2 if is_baseline else 1)
    load = profile["import_s"] + est.weight_bytes / DISK_BYTES_S + 1.0
    sparsity = shape.params() * 4e-9 if est.runtime == "torch" else 2.0  # llama.cpp: tokenizer check instead
    return load + latency + samples + perplexity + sparsity


def estimate_build_s(stages: list[dict[str, Any]], shape: ModelShape, profile: dict[str, Any]) -> float:
    """Seconds to build every stage: start-up, then each method's own estimate (a source reused as it is costs 0)."""
    pairs = stage_methods(stages)
    if len(pairs) == 1 and pairs[0][0].skips_build(shape.dtype, pairs[0][1]):
        return 0.0
    # A method's own passes reach about a quarter of the calibrated 1024^3 matmul's speed.
    speed = BuildSpeed(flops_s=profile["matmul"]["flops_s"] * 0.25, disk_bytes_s=DISK_BYTES_S,
                       source_bytes=shape.params() * DTYPE_BYTES.get(shape.dtype, 4))
    return profile["import_s"] + sum(method.estimate_build_s(options, shape, speed) for method, options in pairs)


def protocol_of(preset: Any) -> dict[str, Any]:
    return {"latency": preset.latency.model_dump(), "eval_tokens": preset.eval.max_tokens, "context": preset.eval.context,
            "stride": preset.eval.stride, "sample_prompts": len(preset.samples.prompts), "sample_tokens": preset.samples.new_tokens}


def plan_preset(preset: Any, shape: ModelShape, profile: dict[str, Any] | None, device: str = "cpu",
                gguf_files: dict[str, str] | None = None, cached: dict[str, bool] | None = None) -> list[VariantPlan]:
    """One plan row per variant, in preset order. `cached[name]`: its artifact is already built."""
    plans = []
    protocol = protocol_of(preset)
    for spec in preset.variants:
        stages = [s.model_dump() for s in spec.stages()]
        est = estimate_weights(shape, stages, gguf_files)
        notes = list(est.notes)
        build_s = measure_s = peak = None
        if profile is not None:
            peak = int(profile["runtime_base_rss_bytes"] + est.weight_bytes + PEAK_EXTRA_BYTES.get(est.family, 400e6))
            if device == "cpu":
                build_s = estimate_build_s(stages, shape, profile)
                measure_s = estimate_measure_s(est, protocol, profile, spec.name == preset.baseline)
            else:
                notes.append("times are calibrated on the CPU only: not estimated for a GPU run")
        plans.append(VariantPlan(spec.name, "+".join(s["method"] for s in stages), est.format, est.weight_bytes, peak,
                                 build_s, measure_s, bool((cached or {}).get(spec.name)), notes))
    return plans


def format_plan(plans: list[VariantPlan], budget_gb: float | None) -> str:
    """The plan as a text table; a variant whose estimated peak exceeds the budget is flagged."""
    header = f"{'variant':<16} {'format':<28} {'weights MB':>10} {'peak MB':>8} {'build s':>8} {'measure s':>9} {'fits?':>6}"
    lines = [header, "-" * len(header)]
    for p in plans:
        fits = "—" if budget_gb is None or p.peak_bytes is None else ("yes" if p.peak_bytes <= budget_gb * 1e9 else "NO")
        build = "cached" if p.cached else ("—" if p.build_s is None else f"{p.build_s:.0f}")
        lines.append(f"{p.name:<16} {p.format[:28]:<28} {p.weight_bytes / 1e6:>10.1f} "
                     f"{'—' if p.peak_bytes is None else f'{p.peak_bytes / 1e6:.0f}':>8} {build:>8} "
                     f"{'—' if p.measure_s is None else f'{p.measure_s:.0f}':>9} {fits:>6}")
        lines.extend(f"{'':<17}note: {n}" for n in p.notes)
    return "\n".join(lines)



# ---- the plan of a preset: from the CLI (nothing prepared yet) or the runner (source prepared) ------------


def cached_variants(preset: Any, fingerprint: str | None, device: str, source_dtype: str) -> dict[str, bool]:
    """Whether each variant's artifact is already in the cache (its last stage's folder exists)."""
    from workbench.cache import key_hash
    from workbench.environment import library_versions
    from workbench.paths import artifacts_dir
    from workbench.running.worker import stage_material

    versions = library_versions()
    found = {}
    for spec in preset.variants:
        stages = [s.model_dump() for s in spec.stages()]
        pairs = stage_methods(stages)
        if len(pairs) == 1 and pairs[0][0].skips_build(source_dtype, pairs[0][1]):
            found[spec.name] = True  # the source folder itself: nothing to build
        elif fingerprint is None:
            found[spec.name] = False
        else:
            key = key_hash(stage_material(fingerprint, stages, len(stages) - 1, versions, device))
            found[spec.name] = (artifacts_dir() / key / "manifest.json").is_file()
    return found


def plan_for_run(preset: Any, prep: dict[str, Any], profile: dict[str, Any] | None, use_cache: bool = True) -> list[VariantPlan]:
    """The runner's plan, made once the source is prepared (its config.json exists)."""
    from workbench.planning.modelshape import shape_from_folder

    source = prep["source"]
    shape = shape_from_folder(Path(source["hf_dir"]))
    cached = cached_variants(preset, source["fingerprint"], prep["device"], shape.dtype) if use_cache else {}
    return plan_preset(preset, shape, profile, prep["device"], {"source": source.get("gguf_file")}, cached)


def over_budget(plans: list[VariantPlan], budget_gb: float | None) -> list[str]:
    """One warning line per variant whose estimated peak memory exceeds the budget."""
    if not budget_gb:
        return []
    return [f"{p.name}: estimated peak {p.peak_bytes / 1e9:.2f} GB exceeds the {budget_gb:g} GB budget "
            f"(weights {p.weight_bytes / 1e9:.2f} GB)" for p in plans if p.peak_bytes and p.peak_bytes > budget_gb * 1e9]


# ---- the command line: `python -m workbench plan PRESET` and the run summary --------------------------------


def _source_state(model: str) -> tuple[str | None, str | None]:
    """(the fingerprint the runner will key artifacts by, a note when the source still needs preparing)."""
    from workbench.data.sources import classify_model, source_cache_state

    ref = classify_model(model)
    # Hashing a very large local folder would take longer than the plan is worth: its cache state stays unknown.
    fingerprint, prepared = source_cache_state(ref, max_hash_bytes=4e9)
    note = None if prepared or ref.kind not in ("bundled", "gguf") else \
        "the GGUF source is converted to an fp32 folder first (once; about 20-40 s per 100 M parameters)"
    return fingerprint, note


def plan_preset_file(preset: Any, recalibrate: bool = False, emit: Any = print) -> tuple[list[VariantPlan], dict[str, Any]]:
    """Plan a preset with nothing prepared: shape from config.json or GGUF metadata, this machine's profile."""
    from workbench.planning.modelshape import read_shape
    from workbench.planning.machine import machine_profile
    from workbench.runtimes.torch import pick_device

    device = pick_device(preset.device)  # a cuda preset on a CPU machine is refused before anything is read
    shape, info = read_shape(preset.model, preset.trust_remote_code)
    profile = machine_profile(preset.threads, refresh=recalibrate, emit=emit)
    fingerprint, prepare_note = _source_state(preset.model)
    cached = cached_variants(preset, fingerprint, device, shape.dtype)
    plans = plan_preset(preset, shape, profile, device, {"source": info.get("gguf_file")}, cached)
    return plans, {"shape": shape, "profile": profile, "device": device, "prepare": prepare_note}


def plan_text(preset: Any, plans: list[VariantPlan], context: dict[str, Any], budget_gb: float | None) -> str:
    from workbench.planning.machine import calibration_note

    shape, profile = context["shape"], context["profile"]
    lines = [f"Plan for '{preset.name}' on {preset.model}: {shape.params() / 1e6:.1f} M parameters "
             f"({shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}, "
             f"{'tied' if shape.tied else 'untied'} embeddings; from {shape.origin}), device {context['device']}."]
    if profile:
        lines.append(f"This machine ({profile['machine']['cpu']}, {preset.threads} threads): memory bandwidth "
                     f"{profile['bandwidth']['bandwidth_bytes_s'] / 1e9:.1f} GB/s, matmul "
                     f"{profile['matmul']['flops_s'] / 1e9:.0f} GFLOP/s, torch import {profile['import_s']:.1f} s "
                     f"(measured {profile['measured_at']}{calibration_note(profile)}; --recalibrate to measure again).")
    lines.append(format_plan(plans, budget_gb))
    if context.get("prepare"):
        lines.append(f"first: {context['prepare']}")
    times = [p.time_s for p in plans if p.time_s is not None]
    if times:
        lines.append(f"estimated total: {sum(times) / 60:.1f} min (builds of uncached artifacts + measuring). "
                     "Weights are usually within a few %; times are rough (+-50 %, more when other work shares the CPU).")
    lines += [f"warning: {w}" for w in over_budget(plans, budget_gb)]
    return "\n".join(lines)


def _error(estimate: float | None, actual: float | None) -> str:
    if estimate is None or not actual:
        return "—"
    return f"{(estimate - actual) / actual * 100:+.0f}%"


def estimate_vs_actual(run: dict[str, Any]) -> str | None:
    """Estimated vs measured weights, peak memory and wall time per variant (records with an estimate only)."""
    rows = []
    for record in run["variants"]:
        est, timing, m = record.get("estimate"), record.get("timing") or {}, record["metrics"]
        if not est or record["status"] != "ok":
            continue
        actual_s = timing.get("measure_s", 0) + (0 if timing.get("build_cached") else timing.get("build_s", 0))
        est_s = est["measure_s"] + (0 if timing.get("build_cached") else (est["build_s"] or 0)) \
            if est.get("measure_s") is not None else None
        est_peak = "—" if est.get("peak_bytes") is None else f"{est['peak_bytes'] / 1e6:.0f}"
        rows.append(f"{record['name']:<16} {est['weight_bytes'] / 1e6:>9.1f} {(m['weight_bytes'] or 0) / 1e6:>9.1f} "
                    f"{_error(est['weight_bytes'], m['weight_bytes']):>6} {est_peak:>8} "
                    f"{(m['peak_rss_bytes'] or 0) / 1e6:>8.0f} {_error(est.get('peak_bytes'), m['peak_rss_bytes']):>6} "
                    f"{'—' if est_s is None else f'{est_s:.0f}':>6} {actual_s:>7.0f} {_error(est_s, actual_s):>6}")
    if not rows:
        return None
    header = (f"{'estimate vs actual':<16} {'est. W MB':>9} {'W MB':>9} {'err':>6} {'est.peak':>8} {'peak MB':>8} "
              f"{'err':>6} {'est. s':>6} {'time s':>7} {'err':>6}")
    return "\n".join([header, *rows, "(time: measuring plus building when the artifact was not cached)"])


def plan_markdown(preset: Any, plans: list[VariantPlan], context: dict[str, Any], budget_gb: float | None) -> str:
    """The plan as Markdown (the UI's Compare tab)."""
    shape = context["shape"]
    lines = [f"**Plan** for `{preset.name}` on `{preset.model}`: {shape.params() / 1e6:.1f} M parameters "
             f"(from {shape.origin}), device {context['device']}. Estimates: weights usually within a few %, "
             "times rough (+-50 %).", "",
             "| variant | format | est. weights MB | est. peak MB | build s | measure s | fits budget? |",
             "|---|---|---|---|---|---|---|"]
    for p in plans:
        fits = "—" if not budget_gb or p.peak_bytes is None else ("yes" if p.peak_bytes <= budget_gb * 1e9 else "**NO**")
        build = "cached" if p.cached else ("—" if p.build_s is None else f"{p.build_s:.0f}")
        lines.append(f"| {p.name} | {p.format} | {p.weight_bytes / 1e6:.1f} | "
                     f"{'—' if p.peak_bytes is None else f'{p.peak_bytes / 1e6:.0f}'} | {build} | "
                     f"{'—' if p.measure_s is None else f'{p.measure_s:.0f}'} | {fits} |")
    notes = [f"- {p.name}: {n}" for p in plans for n in p.notes] + [f"- **warning:** {w}" for w in over_budget(plans, budget_gb)]
    if context.get("prepare"):
        notes.append(f"- first: {context['prepare']}")
    return "\n".join(lines + ([""] + notes if notes else []))
