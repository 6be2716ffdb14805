"""Exact zero counts over weight matrices: global fraction and one row per layer."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def zero_count(tensor) -> tuple[int, int]:
    """(zeros, elements) of a torch tensor or numpy array, counted exactly (no threshold)."""
    if hasattr(tensor, "count_nonzero"):
        elements = int(tensor.numel())
        return elements - int(tensor.count_nonzero()), elements
    array = np.asarray(tensor)
    return int(array.size - np.count_nonzero(array)), int(array.size)


def sparsity_report(named_weights: Iterable[tuple[str, object]]) -> tuple[float | None, list[dict]]:
    """Global zero fraction over all matrices (element-weighted) and per-layer fractions."""
    zeros_total = elements_total = 0
    layers = []
    for name, weight in named_weights:
        zeros, elements = zero_count(weight)
        zeros_total += zeros
        elements_total += elements
        layers.append({"name": name, "sparsity": zeros / elements if elements else None, "kld_contribution": None})
    return (zeros_total / elements_total if elements_total else None), layers

