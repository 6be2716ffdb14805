"""An lm-eval `LM` over the Variant interface, for runtimes lm-eval has no class for (llama.cpp).

Scoring uses the variant's `logits` on the source tokenizer's ids, exactly as the workbench's own
metrics do; context and continuation are tokenized as lm-eval's HFLM does (the whole string, then
split at the context's length), so both paths score the same tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval.api.model import LM

from workbench.metrics.windows import plan_windows
from workbench.data.validity import with_bos


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class VariantLM(LM):
    def __init__(self, variant: Any, max_length: int = 512, bos_id: int | None = None):
        super().__init__()
        self.variant = variant
        self.tokenizer = variant.tokenizer
        self.max_length = max_length
        self.bos_id = bos_id  # requests start with BOS, as HFLM's add_bos_token does on the torch side

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        """Sum of the continuation's token log-probs given the context, and whether greedy decoding yields it."""
        context_ids = self._encode(context)
        whole = self._encode(context + continuation)
        target = whole[len(context_ids):]
        prefix = [self.bos_id] if self.bos_id is not None else []
        ids = (prefix + whole)[-(self.max_length + 1):]
        logp = _log_softmax(self.variant.logits(ids[:-1]))
        rows = logp[len(ids) - 1 - len(target):]
        total = float(sum(rows[i, token] for i, token in enumerate(target)))
        greedy = all(int(rows[i].argmax()) == token for i, token in enumerate(target))
        return total, greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self.score(*request.args) for request in requests]

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for request in requests:
            ids = self._encode(request.args[0])
            total = 0.0
            for window in plan_windows(len(ids), self.max_length, self.max_length):
                logp = _log_softmax(self.variant.logits(with_bos(ids[window.start : window.end], self.bos_id)))
                total += sum(logp[t - window.start - 1, ids[t]] for t in range(window.first_target, window.end))
            totals.append(float(total))
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        eos = self.variant.eos_ids()
        for request in requests:
            context, settings = request.args
            until = [s for s in settings.get("until", []) if s]
            tokens: list[int] = []
            text = ""
            for token in self.variant.generate(self._encode(context)[-self.max_length:], settings.get("max_gen_toks", 64)):
                if token in eos:
                    break
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs
