"""What runs inside a worker process: build a variant's artifact, or load and measure it.

Both functions take a JSON-able payload and an `emit(message)` callback and return JSON-able data;
`workbench.process.run_in_worker` runs them in a fresh process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from workbench import ARTIFACT_FORMAT
from workbench.cache import cached_folder, key_hash
from workbench.environment import library_versions
from workbench.methods.base import BuildContext
from workbench.methods.registry import get_method
from workbench.paths import artifacts_dir

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
    """Apply the variant's stages in order, each cached under a key of everything that shaped it."""
    from workbench.runtimes.torch import pick_device

    import torch

    torch.set_num_threads(payload["threads"])
    device = pick_device(payload["device"])
    ctx = BuildContext(device=device, threads=payload["threads"], trust_remote_code=payload["trust_remote_code"],
                       emit=emit, source_gguf=payload.get("source_gguf"), source_dir=payload["source_dir"])
    current = Path(payload["source_dir"])
    versions = library_versions()
    stages_done = []
    for index, stage in enumerate(payload["stages"]):
        method = get_method(stage["method"])()
        options = method.Options.model_validate(stage["options"])
        if method.reuses_input(current, options):
            stages_done.append({"method": method.name, "artifact_path": str(current), "cached": True, "build_s": 0.0})
            continue
        material = stage_material(payload["source_fingerprint"], payload["stages"], index, versions, device)
        started = time.perf_counter()
        folder, cached = cached_folder(
            artifacts_dir(), key_hash(material),
            lambda out, m=method, o=options, src=current: m.build(src, out, o, ctx),
            material, use_cache=payload["use_cache"], emit=emit,
        )
        stages_done.append({"method": method.name, "artifact_path": str(folder), "cached": cached,
                            "build_s": None if cached else time.perf_counter() - started,
                            "report": _stage_report(folder)})
        current = folder
    labels = [get_method(s["method"]).honesty for s in payload["stages"]]
    return {"artifact_path": str(current), "stages": stages_done, "honesty": _combined_honesty(labels),
            "runtime": get_method(payload["stages"][-1]["method"]).runtime}


def measure_variant(payload: dict, emit: Emit) -> dict:
    """Load the artifact, then measure latency, samples, peak memory, quality and sparsity, in that order."""
    from workbench.metrics.latency import measure_latency, pin_threads

    # Before torch and the runtime start their thread pools, so every thread they create inherits the mask.
    pinned = pin_threads(payload["threads"]) if payload["latency"].get("pin_threads", True) else None
    import torch

    from workbench.metrics.memory import gpu_peak_bytes, peak_rss_bytes
    from workbench.metrics.quality import QUALITY_METRICS, evaluate_quality
    from workbench.metrics.sparsity import sparsity_report
    from workbench.runtimes import load_variant
    from workbench.runtimes.torch import pick_device
    from workbench.validity import with_bos

    threads = payload["threads"]
    torch.set_num_threads(threads)
    device = pick_device(payload["device"])
    tokens = json.loads(Path(payload["eval_tokens_path"]).read_text())

    latency_spec = payload["latency"]
    # llama.cpp sizes its context up front: the longest sequence this protocol feeds it.
    extra = {"n_ctx": max(payload["context"], latency_spec["prompt_tokens"] + latency_spec["new_tokens"],
                          512 + payload["samples"]["new_tokens"])} if payload["runtime"] == "llamacpp" else {}
    emit("loading")
    started = time.perf_counter()
    variant = load_variant(payload["runtime"], name=payload["name"], artifact_path=Path(payload["artifact_path"]),
                           device=device, threads=threads, trust_remote_code=payload["trust_remote_code"], **extra)
    load_s = time.perf_counter() - started

    details: dict = {}
    emit("latency")
    if hasattr(variant, "reset_perf_counters"):
        variant.reset_perf_counters()
    latency_detail: dict = {}
    bos_id = payload.get("bos_id")
    latency = measure_latency(variant.generate, with_bos(tokens[: latency_spec["prompt_tokens"]], bos_id), latency_spec["new_tokens"],
                              latency_spec["warmup"], latency_spec["repeats"], target_ci=latency_spec.get("target_ci"),
                              max_seconds=latency_spec.get("max_seconds", 60.0),
                              max_repeats=latency_spec.get("max_repeats", 500), detail=latency_detail)
    details["latency"] = latency_detail
    if hasattr(variant, "perf_counters"):  # the engine's own clock, beside the wall-clock figures
        counters = variant.perf_counters()
        details["engine_perf"] = {**counters, "scope": "warm-up and timed latency runs",
                                  "decode_tok_s": counters["eval_tokens"] / counters["eval_ms"] * 1000 if counters["eval_ms"] else None}

    # Weight bytes as they sit in memory while the model runs: taken after the first forward passes, because
    # some formats (compressed-tensors' packed GPTQ/AWQ weights on CPU) unpack to float on first use.
    footprint = variant.footprint()

    emit("samples")
    samples = [_sample(variant, prompt, payload["samples"]["new_tokens"]) for prompt in payload["samples"]["prompts"]]

    # Peak memory of serving: load, generation and samples. The perplexity pass below holds
    # full-vocabulary float64 buffers and writes the baseline's log-prob file: measuring overhead.
    peak_rss, gpu_peak = peak_rss_bytes(), gpu_peak_bytes(device)

    emit("perplexity and divergence")
    context, stride = payload["context"], payload["stride"]
    reference_allowed = True
    if hasattr(variant, "tokenizer_agreement"):
        agreement = variant.tokenizer_agreement(tokens)
        details["tokenizer_agreement"] = agreement
        # Same vocabulary means same size and the file's tokenizer reproducing the ids; otherwise logits
        # of "the same id" need not mean the same token, and KLD / top-1 would compare unlike things.
        reference_allowed = agreement["vocab_matching_fraction"] == 1.0
    progress = lambda i, n: emit(f"perplexity window {i}/{n}")  # noqa: E731
    if payload.get("write_reference"):
        # The baseline writes the reference log-probs, then scores a second, independent forward pass
        # against them: its KLD / top-1 then check run-to-run determinism and the reference file itself.
        reference = Path(payload["write_reference"])
        evaluate_quality(variant.logits, tokens, context, stride, write_reference=reference, on_window=progress,
                         bos_id=bos_id)
        quality = evaluate_quality(variant.logits, tokens, context, stride, reference=reference, on_window=progress,
                                   bos_id=bos_id)
    else:
        reference = Path(payload["reference"]) if payload.get("reference") and reference_allowed else None
        quality = evaluate_quality(variant.logits, tokens, context, stride, reference=reference, on_window=progress,
                                   bos_id=bos_id)

    lm_eval_figures: dict = {}
    if payload.get("lm_eval"):
        from workbench.lmeval.harness import run_tasks

        emit("lm-eval tasks")
        spec = payload["lm_eval"]
        lm_eval_figures = run_tasks(variant, spec["tasks"], spec["limit"], spec["batch_size"], device, bos_id=bos_id)

    sparsity, layers = (sparsity_report(variant.weight_matrices()) if hasattr(variant, "weight_matrices") else (None, []))
    metrics = {
        "disk_bytes": footprint.disk_bytes,
        "weight_bytes": footprint.weight_bytes,
        "peak_rss_bytes": peak_rss,
        "gpu_peak_bytes": gpu_peak,
        "load_s": load_s,
        **latency,
        "sparsity": sparsity,
        **{k: quality[k] for k in QUALITY_METRICS},
        **{k: v for k, v in lm_eval_figures.items() if k.startswith("lm_eval.")},
    }
    paired, paired_notes = _paired_with_baseline(payload, samples, lm_eval_figures, reference_allowed)
    metrics.update(paired)
    from workbench.roofline import weights_read

    read = weights_read(variant)  # what one decoded token reads, for the roofline
    variant.close()
    return {
        "weights_read": read,
        "metrics": metrics,
        "layers": layers,
        "samples": samples,
        "quality_detail": {**{k: quality[k] for k in ("nll_mean", "scored_tokens")},
                           "divergence_note": quality["divergence_note"] or (
                               None if reference_allowed else "the GGUF file's vocabulary differs from the source tokenizer's: "
                               "KLD / top-1 / delta-p not computed"),
                           "lm_eval_error": lm_eval_figures.get("lm_eval_error"),
                           "ppl_ratio_note": quality["ppl_ratio_note"],
                           "kld_storage_bound": quality["kld_storage_bound"], **paired_notes},
        "runtime": {"name": payload["runtime"], "threads": threads if payload["runtime"] != "torch" else torch.get_num_threads(),
                    "device": device, "pinned_cpus": pinned},
        **details,
    }


def _sample(variant, prompt: str, new_tokens: int) -> dict:
    ids = variant.chat_ids(prompt) if hasattr(variant, "chat_ids") else list(variant.tokenizer(prompt)["input_ids"])
    eos = variant.eos_ids() if hasattr(variant, "eos_ids") else set()
    output: list[int] = []
    for token in variant.generate(ids, new_tokens):
        if token in eos:
            break
        output.append(token)
    return {"prompt": prompt, "output": variant.tokenizer.decode(output, skip_special_tokens=True), "output_ids": output}


def _paired_with_baseline(payload: dict, samples: list[dict], lm_eval_figures: dict,
                          same_vocab: bool) -> tuple[dict, dict]:
    """Flips per lm-eval task and generation agreement against the baseline's items (metrics/agreement.py).

    The baseline writes its items beside the reference log-probs; later variants read them. Returns
    (metrics, notes); a figure that does not apply is None and its note says why.
    """
    from workbench.metrics.agreement import (FLIP_KEYS, flip_statistics, generation_agreement, items_path,
                                             read_items, write_items)

    outputs = [s["output_ids"] for s in samples]
    items = lm_eval_figures.get("lm_eval_items") or {}
    tasks = list(items) or (payload["lm_eval"]["tasks"] if payload.get("lm_eval") else [])
    metrics: dict = {"samples_exact_match": None, "samples_first_diff_mean": None,
                     **{f"lm_eval.{task}.{key}": None for task in tasks for key in FLIP_KEYS}}
    notes: dict = {}
    if items:  # the evidence behind the flips: this variant's per-item correctness, {task: {doc_id: correct}}
        notes["lm_eval_items"] = items
    if payload.get("write_reference"):
        write_items(items_path(Path(payload["write_reference"])), items, outputs)
        notes["paired_note"] = "this is the baseline: flips and generation agreement are measured against it"
        return metrics, notes
    baseline = read_items(items_path(Path(payload["reference"]))) if payload.get("reference") else None
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

    from workbench import validity
    from workbench.evaltext import eval_text, eval_token_ids
    from workbench.runtimes.torch import pick_device
    from workbench.sources import resolve_source

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
        from workbench.gguf_info import gguf_metadata as read_metadata

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
