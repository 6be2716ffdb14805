"""The Variant interface: a plain-Python variant with known logits goes through the real measuring code.

`KnownLogits` (the package's DummyVariant with an EOS id and weight matrices) is registered as a runtime
with one line, and measured by
`worker.measure_variant` exactly as a built artifact is. Every figure checked is computed again here,
independently, with numpy (perplexity, KL divergence, top-1 agreement, the greedy samples, sparsity).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

from workbench.running.handoff import MeasureRequest, MeasureResult
from workbench.config.presets import LatencySpec, SamplesSpec
from workbench.runtimes import register_runtime
from workbench.runtimes.base import CapabilityMissing, DummyVariant, Footprint, Variant
from workbench.running.worker import measure_variant

VOCAB = 11
CONTEXT = 8
MATRICES = {"layers.0.w": np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]), "layers.1.w": np.array([[4.0, 0.0], [5.0, 6.0]])}


class KnownLogits(DummyVariant):
    """DummyVariant (logits after token t are `table[t]`, text is ids written out, loaded from `table.npy` and
    `footprint.json`), plus an EOS id and weight matrices with known zeros."""

    def eos_ids(self) -> set[int]:
        return {VOCAB - 1}

    def weight_matrices(self) -> Iterator[tuple[str, Any]]:
        return iter(MATRICES.items())


register_runtime("known-logits", f"{__name__}:KnownLogits")


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _request(tmp_path: Path, name: str, table: np.ndarray, tokens: list[int], **extra: Any) -> MeasureRequest:
    folder = tmp_path / name
    folder.mkdir()
    np.save(folder / "table.npy", table)
    (folder / "footprint.json").write_text(json.dumps({"weight_bytes": 1234, "disk_bytes": 5678}))
    tokens_path = tmp_path / "eval_tokens.json"
    tokens_path.write_text(json.dumps(tokens))
    import torch

    return MeasureRequest(
        name=name, runtime="known-logits", artifact_path=str(folder), eval_tokens_path=str(tokens_path),
        threads=torch.get_num_threads(), device="cpu", trust_remote_code=False, context=CONTEXT, stride=CONTEXT,
        # pin_threads off: the worker runs inside the test process here, whose cores must stay as they are.
        latency=LatencySpec(prompt_tokens=4, new_tokens=3, warmup=0, repeats=1, target_ci=None, pin_threads=False),
        samples=SamplesSpec(prompts=["3 1 4", "5 9"], new_tokens=4), **extra)


def test_a_variant_with_known_logits_measures_to_figures_computed_independently(tmp_path) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
    other = (base + rng.normal(scale=0.5, size=base.shape)).astype(np.float32)
    tokens = [int(t) for t in rng.integers(0, VOCAB, size=3 * CONTEXT)]
    reference = tmp_path / "baseline_logprobs.npy"

    baseline = MeasureResult.from_payload(measure_variant(
        _request(tmp_path, "base", base, tokens, write_reference=str(reference)).to_payload(), lambda _m: None))
    variant = MeasureResult.from_payload(measure_variant(
        _request(tmp_path, "other", other, tokens, reference=str(reference)).to_payload(), lambda _m: None))

    # Independent truth: windows of CONTEXT tokens, stride CONTEXT, every token after a window's first is
    # predicted by the logits after the token before it.
    targets = [i for i in range(len(tokens)) if i % CONTEXT != 0]
    base_logp = _log_softmax(base[[tokens[i - 1] for i in targets]])
    other_logp = _log_softmax(other[[tokens[i - 1] for i in targets]])
    rows = np.arange(len(targets))
    wanted = np.array([tokens[i] for i in targets])
    for result, logp in ((baseline, base_logp), (variant, other_logp)):
        assert result.metrics["perplexity"] == pytest.approx(np.exp(-logp[rows, wanted].mean()), rel=1e-9)
        assert result.quality_detail["scored_tokens"] == len(targets)
        assert result.metrics["weight_bytes"] == 1234 and result.metrics["disk_bytes"] == 5678
        assert result.metrics["sparsity"] == pytest.approx(4 / 10)  # 4 zeros among the 10 weights
        assert [row["sparsity"] for row in result.layers] == [pytest.approx(3 / 6), pytest.approx(1 / 4)]
        assert result.runtime.name == "known-logits" and result.engine_perf is None
        assert result.tokenizer_agreement is None
    kld = (np.exp(base_logp) * (base_logp - other_logp)).sum(-1)
    bound = variant.quality_detail["kld_storage_bound"]["kld_mean"]  # the baseline's log-probs are stored as float16
    assert variant.metrics["kld_mean"] == pytest.approx(kld.mean(), abs=bound + 1e-9)
    assert variant.metrics["top1_agreement"] == pytest.approx((base_logp.argmax(-1) == other_logp.argmax(-1)).mean())
    assert baseline.metrics["kld_mean"] == pytest.approx(0.0, abs=1e-6) and baseline.metrics["top1_agreement"] == 1.0

    # Samples: the argmax chain from the prompt's last id, stopping at the EOS id (VOCAB - 1).
    for result, table in ((baseline, base), (variant, other)):
        for sample in result.samples:
            expected, token = [], int(sample["prompt"].split()[-1])
            for _ in range(4):
                token = int(np.argmax(table[token]))
                if token == VOCAB - 1:
                    break
                expected.append(token)
            assert sample["output_ids"] == expected and sample["output"] == " ".join(map(str, expected))


def test_optional_capabilities_have_declared_defaults() -> None:
    """A runtime that overrides only the required methods still answers every question the measuring code asks."""
    variant = KnownLogits("x", np.zeros((VOCAB, VOCAB), np.float32))
    bare = Variant.weight_matrices(variant), Variant.perf_counters(variant), Variant.tokenizer_agreement(variant, [1, 2])
    assert bare == (None, None, None)
    assert variant.weights_read() is None and variant.threads_used(3) == 3
    with pytest.raises(CapabilityMissing, match="lm-eval adapter"):
        variant.lm_eval_model("cpu", 1)
    with pytest.raises(CapabilityMissing, match="tokenizer"):
        Variant.chat_ids(variant, "hello")  # no tokenizer and no override: a clear error, not an AttributeError


def test_a_runtime_missing_a_required_method_cannot_be_instantiated() -> None:
    class NoLogits(Variant):
        @classmethod
        def load(cls, *args: Any, **kwargs: Any) -> "NoLogits":
            return cls()

        def generate(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
            yield from ()

        def footprint(self) -> Footprint:
            return Footprint(0, None)

        def close(self) -> None:
            pass

    with pytest.raises(TypeError, match="logits"):
        NoLogits()
