"""Sliding windows over the eval tokens, and which tokens each window scores (no heavy imports).

Windows start at 0, stride, 2*stride, ...; each holds up to `context` tokens. Each token is scored
once, in the first window where it is not the window's first token and was not scored before (the
Hugging Face sliding-window convention). With stride == context that is every token after the
first of each window ("all"); with stride == context/2, the second half ("second-half").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Window:
    start: int
    end: int  # exclusive
    first_target: int  # absolute index of the first token scored in this window


def plan_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    windows: list[Window] = []
    scored_until = 0  # every target below this index is already scored
    for start in range(0, n_tokens - 1, stride):
        end = min(start + context, n_tokens)
        first_target = max(scored_until, start + 1)
        if first_target < end:
            windows.append(Window(start, end, first_target))
            scored_until = end
        if end == n_tokens:
            break
    return windows


def scored_label(context: int, stride: int) -> str:
    if stride == context:
        return "all"
    if 2 * stride == context:
        return "second-half"
    return f"last-{stride}-of-{context}"


def scored_count(windows: Sequence[Window]) -> int:
    return sum(w.end - w.first_target for w in windows)
