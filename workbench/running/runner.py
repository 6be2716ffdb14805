"""Plan a preset's variants, build their artifacts (cached), and measure each in its own process.

    runner = Runner(load_preset("presets/quickstart.yaml"), on_event=print)
    run = runner.run()          # the results.json document (docs/architecture.md §5)

Order: prepare the source and the eval tokens, then the baseline (its log-probabilities are kept
for KLD), then the other variants in preset order. A variant that fails to build or measure is
recorded as `failed` with a one-line reason and the run goes on; `cancel()` stops the worker in
flight and marks the rest `cancelled`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from workbench.environment import environment
from workbench.errors import WorkbenchError
from workbench.running.handoff import BuildRequest, BuildResult, MeasureRequest, MeasureResult
from workbench.metrics.windows import plan_windows, scored_count, scored_label
from workbench.paths import runs_dir
from workbench.config.presets import Preset, VariantSpec
from workbench.process import WorkerOutcome, run_in_worker
from workbench.data.store import History

METRIC_NAMES = (
    "disk_bytes", "weight_bytes", "peak_rss_bytes", "gpu_peak_bytes", "load_s", "ttft_s", "ttft_s_min", "ttft_s_max",
    "prefill_tok_s", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "sparsity", "perplexity",
    "kld_mean", "kld_p99", "top1_agreement", "delta_p_mean",
    # The llama.cpp --kl-divergence set, the paired perplexity-ratio interval (metrics/quality.py) and
    # generation agreement with the baseline (metrics/agreement.py).
    "kld_mean_stderr", "kld_median", "kld_p90", "kld_p95", "kld_p999", "kld_max", "top1_agreement_stderr",
    "delta_p_mean_stderr", "delta_p_rms", "delta_p_rms_stderr", "delta_p_p01", "delta_p_p05", "delta_p_p50",
    "delta_p_p95", "delta_p_p99", "ln_ppl_ratio_mean", "ln_ppl_ratio_stderr", "ln_ppl_correlation",
    "ppl_ratio", "ppl_ratio_ci95", "ppl_indistinguishable", "samples_exact_match", "samples_first_diff_mean",
    # speed noise (metrics/latency.py): 95 % intervals of the medians, repeats timed, the flag, other processes' cores
    "decode_tok_s_ci95", "ttft_s_ci95", "latency_repeats", "speed_noisy", "contention",
)


@dataclass
class ProgressEvent:
    variant: str | None  # None for run-level events
    phase: str  # preparing | building | measuring | ok | failed | cancelled | done
    message: str
    index: int  # position of the variant in the measuring order, -1 for run-level events
    total: int


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def figures_line(record: dict) -> str:
    """A finished variant's headline figures in one line, for progress output as each variant ends."""
    metrics = record["metrics"]
    parts = []
    for key, label, fmt in (("weight_bytes", "weights", lambda v: f"{v / 1e6:.1f} MB"),
                            ("decode_tok_s", "decode", lambda v: f"{v:.3g} tok/s"),
                            ("perplexity", "ppl", lambda v: f"{v:.4g}"), ("kld_mean", "KLD", lambda v: f"{v:.3g}")):
        if metrics.get(key) is not None:
            parts.append(f"{label} {fmt(metrics[key])}")
    reused = record.get("reused")
    if reused:
        parts.append(f"{reused['figures']} reused from run {reused['run_id']}")
    return ", ".join(parts) or "done"


def method_label(spec: VariantSpec) -> str:
    return "+".join(stage.method for stage in spec.stages())


class Runner:
    def __init__(
        self,
        preset: Preset,
        out_dir: Path | None = None,
        use_cache: bool = True,
        on_event: Callable[[ProgressEvent], None] = lambda _e: None,
        history: History | None = None,
        executor: Callable[..., WorkerOutcome] | None = None,
        visitor: str | None = None,
        reuse_measurements: bool = True,
        reuse_speed: bool = False,
    ):
        self.preset = preset
        self.executor = executor or run_in_worker  # run_in_worker's signature; scaleout.RayExecutor runs on Ray
        self.run_id = new_run_id()
        self.out_dir = Path(out_dir) if out_dir else runs_dir() / self.run_id
        self.use_cache = use_cache
        # Stored figures of an unchanged variant (measure_cache.py): quality reused unless the artifacts are
        # rebuilt; speed only when asked, since it depends on what else the machine is doing.
        self.reuse_measurements = reuse_measurements and use_cache
        self.reuse_speed = reuse_speed and self.reuse_measurements
        self.on_event = on_event
        self.history = history
        self.visitor = visitor  # the app visitor (gradio session) who started the run; None from the CLI
        self._cancel = threading.Event()
        self.worker_pid: int | None = None  # the worker process in flight, for the UI and tests
        self.machine_profile: dict | None = None  # bandwidth / matmul speed of this machine (planning/machine.py)

    def cancel(self) -> None:
        self._cancel.set()

    def _emit(self, variant: str | None, phase: str, message: str, index: int = -1) -> None:
        self.on_event(ProgressEvent(variant, phase, message, index, len(self.preset.variants)))

    def _worker(self, target: str, payload: dict, log_name: str, variant: str | None, phase: str, index: int) -> WorkerOutcome:
        return self.executor(
            target, payload, self.out_dir / "logs" / f"{log_name}.log",
            on_event=lambda message: self._emit(variant, phase, message, index), cancel=self._cancel,
            on_start=lambda pid: setattr(self, "worker_pid", pid),
        )

    def run(self) -> dict[str, Any]:
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
        tokens_path = self.out_dir / "eval_tokens.json"
        self._check_before_preparing()
        prep = self._prepare(tokens_path)
        run = self._run_document(prep)
        estimates = self._plan(prep, run)
        history = self.history or History()
        history.start_run(run, self.out_dir, visitor=self.visitor)
        keys, stored = self._stored_measurements(prep, tokens_path)
        reference = self.out_dir / "baseline_logprobs.npy"
        records = self._measure_variants(run, prep, estimates, stored, reference, history)
        self._after_variants(run, records, prep, history)
        self._store_measurements(records, keys)
        # 16-bit log-probs of every scored token: large, and derivable; with their per-token side file
        # (metrics/quality.py per_token_path). baseline_items.json stays: small, and the flips' evidence.
        for path in (reference, reference.with_name(reference.name + ".per_token.npz")):
            path.unlink(missing_ok=True)
        self._finish(run, history)
        return run

    def _prepare(self, tokens_path: Path) -> dict:
        """Resolve the source and tokenize the eval text, in a worker (workbench.running.worker.prepare_source)."""
        preset = self.preset
        self._emit(None, "preparing", f"resolving {preset.model}")
        prepared = self._worker(
            "workbench.running.worker:prepare_source",
            {"model": preset.model, "trust_remote_code": preset.trust_remote_code, "eval": preset.eval.model_dump(),
             "device": preset.device, "eval_tokens_path": str(tokens_path), "allow_pickle": preset.allow_pickle},
            "prepare", None, "preparing", -1,
        )
        if not prepared.ok:
            raise WorkbenchError(prepared.error or "preparing the model failed")
        return prepared.result

    def _measure_variants(self, run: dict, prep: dict, estimates: dict[str, dict], stored: dict[str, dict],
                          reference: Path, history: History) -> dict[int, dict]:
        """Every variant, the baseline first, each stored and written to results.json as soon as it ends."""
        preset = self.preset
        order = sorted(range(len(preset.variants)), key=lambda i: preset.variants[i].name != preset.baseline)
        baseline_ok = False
        records: dict[int, dict] = {}
        for step, position in enumerate(order):
            spec = preset.variants[position]
            is_baseline = spec.name == preset.baseline
            entry = stored.get(spec.name)
            if self._cancel.is_set():
                record = self._record(spec, "cancelled", "the run was cancelled before this variant started")
            elif entry is not None and self.reuse_speed:
                record = {**entry["record"], "reused": {"run_id": entry["run_id"], "figures": "quality and speed"}}
                self._emit(spec.name, "measuring", f"every figure reused from run {entry['run_id']} (--reuse-speed)", step)
            else:
                record = self._build_and_measure(spec, step, prep, is_baseline, reference, baseline_ok, entry)
            baseline_ok = baseline_ok or (is_baseline and record["status"] == "ok")
            record["estimate"] = estimates.get(spec.name)  # made before anything was built (planning/planner.py)
            records[position] = record
            history.save_variant(self.run_id, position, record)
            run["variants"] = [records[i] for i in sorted(records)]
            self._write_results(run)
            self._emit(spec.name, record["status"], record["error"] or figures_line(record), step)
        return records

    def _after_variants(self, run: dict, records: dict[int, dict], prep: dict, history: History) -> None:
        """The interleaved speed pass (unless every figure was reused) and the per-block sensitivity."""
        all_reused = bool(records) and all(r.get("reused", {}).get("figures") == "quality and speed" for r in records.values())
        if all_reused:
            run["protocol"]["interleave"] = "every figure reused (--reuse-speed), the interleaved ratios included"
        elif not self._cancel.is_set():
            from workbench.running.speedpass import interleaved_pass

            if interleaved_pass(self, records, run):  # paired speed ratios (speedpass.py): store the records again
                self._save_records(run, records, history)
        from workbench.methods.registry import get_method
        from workbench.running.honesty import apply_speed_labels

        claims = {spec.name: get_method(spec.stages()[-1].method).honesty_from_speed for spec in self.preset.variants}
        if apply_speed_labels(records, self.preset.baseline, claims):  # after the paired ratios, its best evidence
            self._save_records(run, records, history)
        if self.preset.sensitivity and not self._cancel.is_set():
            run["sensitivity"] = self._sensitivity(records, prep)

    def _save_records(self, run: dict, records: dict[int, dict], history: History) -> None:
        for position, record in records.items():
            history.save_variant(self.run_id, position, record)
        self._write_results(run)

    def _finish(self, run: dict, history: History) -> None:
        """The run's status, results.json, the HTML report and the history entry."""
        statuses = {r["status"] for r in run["variants"]}
        run["status"] = "cancelled" if "cancelled" in statuses else ("ok" if statuses == {"ok"} else "failed")
        run["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._write_results(run)
        from workbench.views.report import export_html  # plotly loads only now, after the measuring is done

        export_html(run, self.out_dir / "report.html")
        history.finish_run(run, run["status"])
        if self.history is None:
            history.close()
        self._emit(None, "done", f"run {self.run_id}: {run['status']}")

    def _stored_measurements(self, prep: dict, tokens_path: Path) -> tuple[dict[str, str], dict[str, dict]]:
        """Each variant's measurement key, and the stored entries this run may reuse (measure_cache.py)."""
        from workbench.cache import file_sha256
        from workbench.running.measure_cache import load_entry, measurement_key

        preset = self.preset
        by_name = {spec.name: spec for spec in preset.variants}
        baseline = by_name.get(preset.baseline)
        common = {
            "source": prep["source"]["fingerprint"], "eval_tokens": file_sha256(tokens_path),
            "eval": preset.eval.model_dump(mode="json"), "latency": preset.latency.model_dump(mode="json"),
            "samples": preset.samples.model_dump(mode="json"),
            "lm_eval": preset.lm_eval.model_dump(mode="json") if preset.lm_eval else None,
            "bos_id": prep["validity"]["bos_id"], "threads": preset.threads, "device": preset.device,
            "environment": environment(preset.threads, prep["device"]),
            "baseline": [s.model_dump(mode="json") for s in baseline.stages()] if baseline else None,
        }
        keys = {spec.name: measurement_key({**common, "is_baseline": spec.name == preset.baseline,
                                            "stages": [s.model_dump(mode="json") for s in spec.stages()]})
                for spec in preset.variants}
        if not self.reuse_measurements:
            return keys, {}
        stored = {name: entry for name, key in keys.items() if (entry := load_entry(key)) is not None}
        # Without every variant stored, the baseline is measured afresh: the others' KLD needs its log-probs.
        if len(stored) < len(keys):
            stored.pop(preset.baseline, None)
        if stored:
            self._emit(None, "preparing", f"reusing the stored {'figures' if self.reuse_speed else 'quality figures'} "
                                          f"of {', '.join(sorted(stored))} (nothing that shaped them changed)")
        return keys, stored

    def _store_measurements(self, records: dict[int, dict], keys: dict[str, str]) -> None:
        from workbench.running.measure_cache import store_entry

        for record in records.values():
            if record["status"] == "ok" and record.get("reused", {}).get("figures") != "quality and speed":
                store_entry(keys[record["name"]], self.run_id, record)

    def _check_before_preparing(self) -> None:
        """What the methods refuse from the model's shape (`Method.refusals`), read from its config: seconds, not a
        calibration's minutes."""
        from workbench.config.policy import shape_refusals
        from workbench.methods.registry import get_method
        from workbench.planning.modelshape import read_shape

        if not any(get_method(s.method).checks_shape() for v in self.preset.variants for s in v.stages()):
            return
        try:
            shape, _ = read_shape(self.preset.model, self.preset.trust_remote_code)
        except WorkbenchError:  # ShapeError and the like: preparing the model will say what is wrong
            return
        reasons = shape_refusals(self.preset, shape)
        if reasons:
            from workbench.config.policy import PolicyError

            raise PolicyError(reasons)

    def _build_and_measure(self, spec: VariantSpec, step: int, prep: dict, is_baseline: bool,
                           reference: Path, baseline_ok: bool, stored: dict | None = None) -> dict:
        """Build (or find) the artifact and measure it; with a `stored` entry, time it and reuse the quality figures."""
        preset = self.preset
        self._emit(spec.name, "building", "building the artifact", step)
        started = time.perf_counter()
        build_request = BuildRequest(
            stages=[s.model_dump() for s in spec.stages()], source_dir=prep["source"]["hf_dir"],
            source_fingerprint=prep["source"]["fingerprint"], source_gguf=prep["source"]["gguf_file"],
            threads=preset.threads, device=preset.device, trust_remote_code=preset.trust_remote_code,
            use_cache=self.use_cache)
        outcome = self._worker("workbench.running.worker:build_artifact", build_request.to_payload(), f"{spec.name}-build",
                               spec.name, "building", step)
        if not outcome.ok:
            return self._record(spec, "cancelled" if outcome.cancelled else "failed", f"build: {outcome.error}")
        built = BuildResult.from_payload(outcome.result)
        if stored is not None:
            from workbench.running.measure_cache import artifact_identity

            if artifact_identity(built.artifact_path) != stored["artifact"]:  # rebuilt since: measure it all again
                stored = None
        self._emit(spec.name, "measuring", "measuring", step)
        build_wall_s, started = time.perf_counter() - started, time.perf_counter()
        request = MeasureRequest(
            name=spec.name, runtime=built.runtime, artifact_path=built.artifact_path,
            eval_tokens_path=str(self.out_dir / "eval_tokens.json"), threads=preset.threads, device=preset.device,
            trust_remote_code=preset.trust_remote_code, context=preset.eval.context, stride=preset.eval.stride,
            latency=preset.latency, samples=preset.samples, lm_eval=preset.lm_eval, bos_id=prep["validity"]["bos_id"],
            write_reference=str(reference) if is_baseline and stored is None else None,
            reference=str(reference) if baseline_ok and not is_baseline and stored is None and reference.exists() else None,
            measure_quality=stored is None)
        measured = self._worker("workbench.running.worker:measure_variant", request.to_payload(), f"{spec.name}-measure",
                                spec.name, "measuring", step)
        record = self._record(spec, "ok", None, built)
        record["timing"] = {"build_s": build_wall_s, "build_cached": all(s.cached for s in built.stages),
                            "measure_s": time.perf_counter() - started}
        if not measured.ok:
            record.update(status="cancelled" if measured.cancelled else "failed", error=f"measure: {measured.error}")
            return record
        result = MeasureResult.from_payload(measured.result)
        record["metrics"].update(result.metrics)
        record.update(layers=result.layers, samples=result.samples, runtime=result.runtime.to_record(),
                      quality_detail=result.quality_detail, latency=result.latency)
        if result.engine_perf is not None:  # runtime-specific details, when the runtime has them
            record["engine_perf"] = result.engine_perf
        if result.tokenizer_agreement is not None:
            record["tokenizer_agreement"] = result.tokenizer_agreement
        for key in ("gguf", "bnb"):  # the format's own report (gguf: the type mix; bnb-auto's choice), last stage first
            found = next((stage.report[key] for stage in reversed(built.stages) if (stage.report or {}).get(key)), None)
            if found:
                record[key] = found
        if result.runtime.device == "cpu":  # the bandwidth is this CPU's: no roofline for GPU runs
            from workbench.planning.roofline import roofline

            bandwidth = (self.machine_profile or {}).get("bandwidth", {}).get("bandwidth_bytes_s")
            record["roofline"] = roofline(bandwidth, record["metrics"]["weight_bytes"], result.weights_read,
                                          record["metrics"]["decode_tok_s"])
        if stored is not None:
            from workbench.running.measure_cache import merge_quality

            record = merge_quality(record, stored["record"])
            record["reused"] = {"run_id": stored["run_id"], "figures": "quality"}
        elif not is_baseline and not baseline_ok:
            record["quality_detail"]["divergence_note"] = "the baseline failed, so KLD / top-1 / delta-p are null"
        elif not is_baseline and not reference.exists():
            record["quality_detail"]["divergence_note"] = (
                "this variant's artifact was rebuilt, but the baseline's figures were reused, so its log-probs are not "
                "in this run: KLD / top-1 / delta-p are null (run again with --no-cache)")
        from workbench.data.validity import sanity_flags

        record["flags"] = sanity_flags(record, is_baseline, prep["validity"])
        return record

    def _plan(self, prep: dict, run: dict) -> dict[str, dict]:
        """Estimates of every variant from the model config and this machine's profile, before anything is built."""
        from workbench.planning.planner import over_budget, plan_for_run
        from workbench.planning.machine import machine_profile

        self.machine_profile = machine_profile(self.preset.threads, emit=lambda m: self._emit(None, "preparing", m),
                                               log_dir=self.out_dir / "logs")
        run["machine_profile"] = self.machine_profile
        try:
            plans = plan_for_run(self.preset, prep, self.machine_profile, self.use_cache)
        except Exception as exc:  # an estimate must never stop a run: say why there is none
            self._emit(None, "preparing", f"no estimates: {exc}")
            run["over_budget"] = None  # unknown, not "fits"
            return {}
        run["over_budget"] = over_budget(plans, self.preset.memory_budget_gb)  # the verdict, kept in results.json
        for warning in run["over_budget"]:
            self._emit(None, "preparing", f"warning: {warning}")
        return {p.name: p.record() for p in plans}

    def _sensitivity(self, records: dict[int, dict], prep: dict) -> dict:
        """Per-block KLD of the chosen variant, and the mixed-precision variant that table suggests."""
        from workbench.analysis.sensitivity import most_sensitive, suggested_variant

        spec = self.preset.sensitivity
        assert spec is not None
        by_name = {r["name"]: r for r in records.values()}
        target, base = by_name[spec.variant], by_name[self.preset.baseline]
        result: dict[str, Any] = {"variant": spec.variant, "method": target["method"], "unit": "decoder block",
                                  "eval_tokens": spec.max_tokens, "rows": None, "error": None,
                                  "protocol": "block i of the fp32 baseline replaced by the variant's block i, "
                                              "weights dequantized to float; KLD against the baseline"}
        if target["status"] != "ok" or base["status"] != "ok" or target.get("runtime", {}).get("name") != "torch":
            result["error"] = "needs the baseline and a torch variant that both measured ok"
            return result
        self._emit(spec.variant, "measuring", "per-block sensitivity", -1)
        outcome = self._worker(
            "workbench.analysis.sensitivity:sensitivity_worker",
            {"baseline_dir": base["artifact_path"], "variant_dir": target["artifact_path"], "threads": self.preset.threads,
             "eval_tokens_path": str(self.out_dir / "eval_tokens.json"), "max_tokens": spec.max_tokens,
             "context": self.preset.eval.context, "stride": self.preset.eval.stride, "bos_id": prep["validity"]["bos_id"]},
            f"{spec.variant}-sensitivity", spec.variant, "measuring", -1,
        )
        if not outcome.ok:
            result["error"] = outcome.error
            return result
        result["rows"] = outcome.result
        keep = most_sensitive(outcome.result, spec.keep)
        result["most_sensitive"] = keep
        stages = target["stages"]
        suggestion = suggested_variant(f"{spec.variant}-keep{spec.keep}", keep, stages[0]) if len(stages) == 1 else None
        if suggestion:
            result["mixed_precision_variant"] = suggestion
        return result

    def _record(self, spec: VariantSpec, status: str, error: str | None, built: BuildResult | None = None) -> dict:
        return {
            "name": spec.name,
            "method": method_label(spec),
            "options": spec.options if spec.pipeline is None else {},
            "stages": [s.model_dump() for s in spec.stages()],
            "status": status,
            "error": error,
            "honesty": built.honesty if built else None,
            "artifact_path": built.artifact_path if built else None,
            "build": [asdict(stage) for stage in built.stages] if built else None,
            "metrics": {name: None for name in METRIC_NAMES},
            "layers": [],
            "samples": [],
            "flags": [],
        }

    def _run_document(self, prep: dict) -> dict[str, Any]:
        preset = self.preset
        windows = plan_windows(prep["eval_tokens"], preset.eval.context, preset.eval.stride)
        return {
            "run_id": self.run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "preset": preset.model_dump(mode="json"),
            "model": {**prep["source"], "tokenizer": prep["tokenizer"]},
            "environment": environment(preset.threads, prep["device"]),
            "protocol": {
                "eval_text": preset.eval.text,
                "eval_text_detail": prep["eval_text"],
                "eval_tokens": prep["eval_tokens"],
                "tokenization": "source tokenizer, no special tokens added; ids in eval_tokens.json",
                "bos": prep["validity"]["bos"],
                "bos_detail": (f"BOS (id {prep['validity']['bos_id']}) replaces the first token of every window and "
                               "latency prompt, and starts every lm-eval request" if prep["validity"]["bos"] else
                               "no BOS") + f" ({prep['validity']['bos_reason']})",
                "chars_per_token": prep["validity"]["chars_per_token"],
                "tokenizer_agreement": prep["validity"]["tokenizer_agreement"],
                "unigram_perplexity": prep["validity"]["unigram_perplexity"],
                "context": preset.eval.context,
                "stride": preset.eval.stride,
                "scored": scored_label(preset.eval.context, preset.eval.stride),
                "scored_tokens": scored_count(windows),
                "baseline_divergence": "the baseline's KLD / top-1 / delta-p compare a second forward pass with its first",
                "reference_storage": "baseline log-probs as float16 (KLD within quality_detail.kld_storage_bound); "
                                     "target log-prob and argmax per token exact",
                "ppl_ratio_interval": "95 % paired t interval over per-window NLL differences (metrics/quality.py)",
                "prompt_tokens": preset.latency.prompt_tokens,
                "latency_prompt": "the first prompt_tokens eval token ids; greedy decoding, EOS ignored",
                "new_tokens": preset.latency.new_tokens,
                "warmup": preset.latency.warmup,
                "repeats": preset.latency.repeats,
                "latency_statistic": "median over repeats, with min and max",
                "latency_repeats": (f"at least {preset.latency.repeats} timed repeats, then more until both 95 % intervals "
                                    f"lie within +-{preset.latency.target_ci:.0%} of the median (from 6 repeats on), "
                                    f"{preset.latency.max_seconds:g} s of timing or {preset.latency.max_repeats} repeats; "
                                    "the record's latency.stop says which" if preset.latency.target_ci else
                                    f"exactly {preset.latency.repeats} timed repeats"),
                "latency_ci95": "distribution-free 95 % interval of each median from the repeats' order statistics "
                                "(binomial ranks); below 6 repeats it is [min, max], whose coverage is lower",
                "contention": "other processes' CPU use during the timed repeats, in cores (/proc/stat busy time minus "
                              "the worker's own), wall-time-weighted mean",
                "speed_noisy": "an interval reaches beyond +-10 % of its median, or contention > 0.25 core",
                "pinned_threads": "the measuring worker's threads pinned to its lowest `threads` allowed cores "
                                  "(record runtime.pinned_cpus)" if preset.latency.pin_threads else "not pinned",
                "peak_rss": "VmHWM of the measuring worker process from its start through load, latency runs and samples (the perplexity pass comes after); the worker is forked from a server that imported torch and transformers, so their pages count as far as the worker has them resident",
                "weight_bytes": "bytes of the loaded model's state_dict tensors, each storage counted once",
                "sparsity": "exact zero fraction over Linear and Embedding weights (bnb 4-bit dequantized)",
                "samples": f"greedy, chat template, up to {preset.samples.new_tokens} new tokens, stop at EOS",
                "lm_eval": (
                    {**preset.lm_eval.model_dump(), "harness": "lm-eval-harness, zero-shot, acc with bootstrap stderr"}
                    if preset.lm_eval else None
                ),
            },
            "status": "running",
            "memory_budget_gb": preset.memory_budget_gb,
            "over_budget": [],
            "out_dir": str(self.out_dir),
            "variants": [],
        }

    def _write_results(self, run: dict) -> None:
        path = self.out_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(path)
