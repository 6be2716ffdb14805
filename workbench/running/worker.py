"""What runs inside a worker process: build a variant's artifact, or load and measure it.

Both functions take a JSON-able payload and an `emit(message)` callback and return JSON-able data;
`workbench.process.run_in_worker` runs them in a fresh process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench import ARTIFACT_FORMAT
from workbench.cache import cached_folder, key_hash
from workbench.environment import library_versions
from workbench.methods.base import BuildContext
from workbench.methods.registry import get_method, register_targets
from workbench.paths import artifacts_dir
from workbench.running.handoff import BuildRequest, BuildResult, MeasureRequest, MeasureResult, RuntimeInfo, StageBuild
from workbench.runtimes.base import Footprint, Variant

Emit = Callable[[str], None]


def _combined_honesty(labels: list[str]) -> str:
    """A pipeline is only as real as its least real stage."""
    for label in ("simulated", "dense-with-zeros"):
        if label in labels:
            return label
    return labels[-1]


def _stage_report(folder: Path) -> dict | None:
    """What a method chose to report about its build (e.g. distillation's loss curve), if anything."""
    path = folder / "stage_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stage_material(source_fingerprint: str, stages: list[dict], index: int, versions: dict, device: str) -> dict:
    """Everything that shapes stage `index`'s artifact; its hash names the cache folder (the planner checks it too)."""
    return {"source": source_fingerprint, "stages": stages[: index + 1], "versions": versions,
            "format": ARTIFACT_FORMAT, "device": device}


def build_artifact(payload: dict, emit: Emit) -> dict:
    """Apply the variant's stages in order, each cached under a key of everything that shaped it.

    `payload` is a `BuildRequest.to_payload()`; the result a `BuildResult.to_payload()` (handoff.py).
    """
    from workbench.runtimes.torch import pick_device

    import torch

    request = BuildRequest.from_payload(payload)
    register_targets(request.methods)
    torch.set_num_threads(request.threads)
    device = pick_device(request.device)
    ctx = BuildContext(device=device, threads=request.threads, trust_remote_code=request.trust_remote_code,
                       emit=emit, source_gguf=request.source_gguf, source_dir=request.source_dir)
    current = Path(request.source_dir)
    versions = library_versions()
    stages_done: list[StageBuild] = []
    for index, stage in enumerate(request.stages):
        method = get_method(stage["method"])()
        options = method.Options.model_validate(stage["options"])
        if method.reuses_input(current, options):
            stages_done.append(StageBuild(method.name, str(current), cached=True, build_s=0.0))
            continue
        material = stage_material(request.source_fingerprint, request.stages, index, versions, device)
        started = time.perf_counter()
        folder, cached = cached_folder(
            artifacts_dir(), key_hash(material),
            lambda out, m=method, o=options, src=current: m.build(src, out, o, ctx),
            material, use_cache=request.use_cache, emit=emit,
        )
        stages_done.append(StageBuild(method.name, str(folder), cached,
                                      None if cached else time.perf_counter() - started, _stage_report(folder)))
        current = folder
    labels = [get_method(s["method"]).honesty for s in request.stages]
    return BuildResult(str(current), stages_done, _combined_honesty(labels),
                       get_method(request.stages[-1]["method"]).runtime).to_payload()


def measure_variant(payload: dict, emit: Emit) -> dict:
    """Load the artifact, then measure latency, samples, peak memory, quality and sparsity, in that order.

    `payload` is a `MeasureRequest.to_payload()`; the result a `MeasureResult.to_payload()` (handoff.py).
    """
    from workbench.metrics.latency import pin_threads

    request = MeasureRequest.from_payload(payload)
    # Before torch and the runtime start their thread pools, so every thread they create inherits the mask.
    pinned = pin_threads(request.threads) if request.latency.pin_threads else None
    import torch

    from workbench.metrics.sparsity import sparsity_report
    from workbench.planning.roofline import weights_read
    from workbench.runtimes.torch import pick_device

    torch.set_num_threads(request.threads)
    device = pick_device(request.device)
    tokens = json.loads(Path(request.eval_tokens_path).read_text())
    variant, load_s = _load(request, device, emit)
    serving = _serving_pass(variant, tokens, request, device, emit)
    if not request.measure_quality:  # the runner reuses stored quality figures (measure_cache.py)
        read, threads_used = weights_read(variant), variant.threads_used(request.threads)
        variant.close()
        metrics = {"disk_bytes": serving.footprint.disk_bytes, "weight_bytes": serving.footprint.weight_bytes,
                   "peak_rss_bytes": serving.peak_rss, "gpu_peak_bytes": serving.gpu_peak, "load_s": load_s,
                   **serving.latency}
        return MeasureResult(metrics=metrics, layers=[], samples=serving.samples, quality_detail={},
                             runtime=RuntimeInfo(request.runtime, threads_used, device, pinned), weights_read=read,
                             latency=serving.latency_detail, engine_perf=serving.engine_perf).to_payload()

    emit("perplexity and divergence")
    agreement = variant.tokenizer_agreement(tokens)
    # Same vocabulary means same size and the file's tokenizer reproducing the ids; otherwise logits
    # of "the same id" need not mean the same token, and KLD / top-1 would compare unlike things.
    reference_allowed = agreement is None or agreement["vocab_matching_fraction"] == 1.0
    quality = _quality(variant, tokens, request, reference_allowed, emit)
    lm_eval_figures = _lm_eval(variant, request, device, emit)

    matrices = variant.weight_matrices()
    sparsity, layers = sparsity_report(matrices) if matrices is not None else (None, [])
    metrics = _variant_metrics(serving, load_s, sparsity, quality, lm_eval_figures)
    paired, paired_notes = _paired_with_baseline(request, serving.samples, lm_eval_figures, reference_allowed)
    metrics.update(paired)
    read = weights_read(variant)  # what one decoded token reads, for the roofline
    threads_used = variant.threads_used(request.threads)
    variant.close()
    return MeasureResult(metrics=metrics, layers=layers, samples=serving.samples,
                         quality_detail=_quality_detail(quality, reference_allowed, lm_eval_figures, paired_notes),
                         runtime=RuntimeInfo(request.runtime, threads_used, device, pinned), weights_read=read,
                         latency=serving.latency_detail, engine_perf=serving.engine_perf,
                         tokenizer_agreement=agreement).to_payload()


@dataclass
class _Serving:
    """What the serving part of a measurement yields: speed, weight bytes after first use, samples, peaks."""

    latency: dict
    latency_detail: dict
    engine_perf: dict | None
    footprint: Footprint
    samples: list[dict]
    peak_rss: int
    gpu_peak: int | None


def _load(request: MeasureRequest, device: str, emit: Emit) -> tuple[Variant, float]:
    """The artifact loaded by its runtime, and the seconds that took."""
    from workbench.runtimes import load_variant

    latency_spec = request.latency
    # The longest sequence this protocol feeds (llama.cpp sizes its context up front).
    n_ctx = max(request.context, latency_spec.prompt_tokens + latency_spec.new_tokens, 512 + request.samples.new_tokens)
    emit("loading")
    started = time.perf_counter()
    variant = load_variant(request.runtime, name=request.name, artifact_path=Path(request.artifact_path), device=device,
                           threads=request.threads, trust_remote_code=request.trust_remote_code, n_ctx=n_ctx)
    return variant, time.perf_counter() - started


def _serving_pass(variant: Variant, tokens: list[int], request: MeasureRequest, device: str, emit: Emit) -> _Serving:
    """Latency, the in-memory weight bytes, the samples, then the peak memory of all that."""
    from workbench.metrics.memory import gpu_peak_bytes, peak_rss_bytes

    emit("latency")
    latency, latency_detail, engine_perf = _timed_latency(variant, tokens, request)
    # Weight bytes as they sit in memory while the model runs: taken after the first forward passes, because
    # some formats (compressed-tensors' packed GPTQ/AWQ weights on CPU) unpack to float on first use.
    footprint = variant.footprint()

    emit("samples")
    samples = [_sample(variant, prompt, request.samples.new_tokens) for prompt in request.samples.prompts]

    # Peak memory of serving: load, generation and samples. The perplexity pass that follows holds
    # full-vocabulary float64 buffers and writes the baseline's log-prob file: measuring overhead.
    return _Serving(latency, latency_detail, engine_perf, footprint, samples, peak_rss_bytes(), gpu_peak_bytes(device))


def _lm_eval(variant: Variant, request: MeasureRequest, device: str, emit: Emit) -> dict:
    """The preset's lm-eval tasks on this variant ({} when the preset asks for none)."""
    if request.lm_eval is None:
        return {}
    from workbench.lmeval.harness import run_tasks

    emit("lm-eval tasks")
    spec = request.lm_eval
    return run_tasks(variant, spec.tasks, spec.limit, spec.batch_size, device, bos_id=request.bos_id)


def _variant_metrics(serving: _Serving, load_s: float, sparsity: float | None, quality: dict,
                     lm_eval_figures: dict) -> dict:
    """The record's metrics before the paired figures: sizes, memory, speed, sparsity, quality, lm-eval."""
    from workbench.metrics.quality import QUALITY_METRICS

    return {
        "disk_bytes": serving.footprint.disk_bytes,
        "weight_bytes": serving.footprint.weight_bytes,
        "peak_rss_bytes": serving.peak_rss,
        "gpu_peak_bytes": serving.gpu_peak,
        "load_s": load_s,
        **serving.latency,
        "sparsity": sparsity,
        **{k: quality[k] for k in QUALITY_METRICS},
        **{k: v for k, v in lm_eval_figures.items() if k.startswith("lm_eval.")},
    }


def _quality_detail(quality: dict, reference_allowed: bool, lm_eval_figures: dict, paired_notes: dict) -> dict:
    """The notes and raw figures behind the quality metrics (the record's `quality_detail`)."""
    return {
        **{k: quality[k] for k in ("nll_mean", "scored_tokens")},
        "divergence_note": quality["divergence_note"] or (
            None if reference_allowed else "the GGUF file's vocabulary differs from the source tokenizer's: "
            "KLD / top-1 / delta-p not computed"),
        "lm_eval_error": lm_eval_figures.get("lm_eval_error"),
        "ppl_ratio_note": quality["ppl_ratio_note"],
        "kld_storage_bound": quality["kld_storage_bound"], **paired_notes}


def _timed_latency(variant: Variant, tokens: list[int], request: MeasureRequest) -> tuple[dict, dict, dict | None]:
    """(latency metrics, per-repeat detail, the engine's own clock over the same runs or None)."""
    from workbench.metrics.latency import measure_latency
    from workbench.data.validity import with_bos

    spec = request.latency
    variant.reset_perf_counters()
    detail: dict = {}
    latency = measure_latency(variant.generate, with_bos(tokens[: spec.prompt_tokens], request.bos_id), spec.new_tokens,
                              spec.warmup, spec.repeats, target_ci=spec.target_ci, max_seconds=spec.max_seconds,
                              max_repeats=spec.max_repeats, detail=detail)
    counters = variant.perf_counters()
    engine_perf = None if counters is None else {  # the engine's own clock, beside the wall-clock figures
        **counters, "scope": "warm-up and timed latency runs",
        "decode_tok_s": counters["eval_tokens"] / counters["eval_ms"] * 1000 if counters["eval_ms"] else None}
    return latency, detail, engine_perf


def _quality(variant: Variant, tokens: list[int], request: MeasureRequest, reference_allowed: bool, emit: Emit) -> dict:
    """Perplexity, and divergence from the baseline's stored log-probs when there are comparable ones."""
    from workbench.metrics.quality import evaluate_quality

    progress = lambda i, n: emit(f"perplexity window {i}/{n}")  # noqa: E731
    context, stride, bos_id = request.context, request.stride, request.bos_id
    if request.write_reference:
        # The baseline writes the reference log-probs, then scores a second, independent forward pass
        # against them: its KLD / top-1 then check run-to-run determinism and the reference file itself.
        reference = Path(request.write_reference)
        evaluate_quality(variant.logits, tokens, context, stride, write_reference=reference, on_window=progress,
                         bos_id=bos_id)
    else:
        reference = Path(request.reference) if request.reference and reference_allowed else None
    return evaluate_quality(variant.logits, tokens, context, stride, reference=reference, on_window=progress,
                            bos_id=bos_id)


def _sample(variant: Variant, prompt: str, new_tokens: int) -> dict:
    eos = variant.eos_ids()
    output: list[int] = []
    for token in variant.generate(variant.chat_ids(prompt), new_tokens):
        if token in eos:
            break
        output.append(token)
    return {"prompt": prompt, "output": variant.decode(output), "output_ids": output}


def _paired_with_baseline(request: MeasureRequest, samples: list[dict], lm_eval_figures: dict,
                          same_vocab: bool) -> tuple[dict, dict]:
    """Flips per lm-eval task and generation agreement against the baseline's items (metrics/agreement.py).

    The baseline writes its items beside the reference log-probs; later variants read them. Returns
    (metrics, notes); a figure that does not apply is None and its note says why.
    """
    from workbench.metrics.agreement import (FLIP_KEYS, flip_statistics, generation_agreement, items_path,
                                             read_items, write_items)

    outputs = [s["output_ids"] for s in samples]
    items = lm_eval_figures.get("lm_eval_items") or {}
    tasks = list(items) or (request.lm_eval.tasks if request.lm_eval else [])
    metrics: dict = {"samples_exact_match": None, "samples_first_diff_mean": None,
                     **{f"lm_eval.{task}.{key}": None for task in tasks for key in FLIP_KEYS}}
    notes: dict = {}
    if items:  # the evidence behind the flips: this variant's per-item correctness, {task: {doc_id: correct}}
        notes["lm_eval_items"] = items
    if request.write_reference:
        write_items(items_path(Path(request.write_reference)), items, outputs)
        notes["paired_note"] = "this is the baseline: flips and generation agreement are measured against it"
        return metrics, notes
    baseline = read_items(items_path(Path(request.reference))) if request.reference else None
    if baseline is None:
        notes["paired_note"] = "no baseline items (the baseline failed or was not measured): flips and agreement are null"
        return metrics, notes
    if same_vocab:
        agreement = generation_agreement(baseline["samples"], outputs)
        metrics.update({k: agreement[k] for k in ("samples_exact_match", "samples_first_diff_mean")})
        notes["samples_note"] = agreement["note"]
    else:
        notes["samples_note"] = "the vocabulary differs from the baseline's: output token ids are not comparable"
    flip_notes = {}
    for task, variant_items in items.items():
        base_items = baseline["lm_eval"].get(task)
        if base_items is None:
            flip_notes[task] = "the baseline has no per-item results for this task"
            continue
        stats = flip_statistics(base_items, variant_items)
        metrics.update({f"lm_eval.{task}.{key}": stats[key] for key in FLIP_KEYS})
        if stats["note"]:
            flip_notes[task] = stats["note"]
    if flip_notes:
        notes["flips_notes"] = flip_notes
    return metrics, notes


def prepare_source(payload: dict, emit: Emit) -> dict:
    """Resolve (and if needed convert) the model, check that it can be measured correctly (validity.py), then
    tokenize the eval text once into eval_tokens.json."""
    from transformers import AutoTokenizer

    from workbench.data import validity
    from workbench.data.evaltext import eval_text, eval_token_ids
    from workbench.runtimes.torch import pick_device
    from workbench.data.sources import resolve_source

    device = pick_device(payload["device"])  # before the model is prepared: a CPU machine refuses cuda in seconds
    source = resolve_source(payload["model"], payload["trust_remote_code"], emit,
                            allow_pickle=payload.get("allow_pickle", False))
    emit("checking the weights")
    weights = validity.check_weights(source.hf_dir, source.spec, payload["trust_remote_code"])
    emit("tokenizing the eval text")
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir, trust_remote_code=payload["trust_remote_code"])
    text, description = eval_text(payload["eval"]["text"])
    ids = eval_token_ids(tokenizer, text, payload["eval"]["max_tokens"], payload["eval"]["context"])
    scored_text = tokenizer.decode(ids)
    density = validity.check_token_density(scored_text, ids, source.spec)
    agreement = None
    gguf_metadata = None
    if source.gguf_file:
        from workbench.data.gguf_info import gguf_metadata as read_metadata

        emit("checking the tokenizer against the GGUF file's own")
        agreement = validity.gguf_tokenizer_agreement(Path(source.gguf_file), scored_text, ids)
        validity.check_gguf_tokenizer(agreement, source.spec)
        gguf_metadata = read_metadata(Path(source.gguf_file))
    bos = validity.bos_policy(tokenizer, gguf_metadata, payload["eval"].get("bos"))
    Path(payload["eval_tokens_path"]).write_text(json.dumps(ids))
    return {"source": source.to_record(), "eval_text": description, "eval_tokens": len(ids),
            "device": device, "tokenizer": type(tokenizer).__name__,
            "validity": {**bos.to_record(), "chars_per_token": density, "tokenizer_agreement": agreement,
                         "unigram_perplexity": validity.unigram_perplexity(ids), "weights": weights}}
