"""Choosing a tensor type per unit (decoder block, embedding, output head) under a size budget.

Input: for every unit, the bytes and the measured KLD to the baseline of each candidate type when only
that unit is quantized (`gguf-auto` measures these; `bnb-auto` has two options per block: quantized, or
kept in float at zero KLD). Assumption: KLDs of units add up, which holds to
first order for small perturbations and is what llama.cpp's and exllamav2's per-layer allocators assume too.

Allocation is the classic Lagrangian greedy for this multiple-choice knapsack: every unit starts at its
cheapest option and the upgrade with the largest KLD reduction per added byte that still fits is taken,
repeatedly, walking each unit along the lower convex hull of its (bytes, KLD) points (an option above
the hull is never the best use of its bytes at any exchange rate). Every solution the walk passes
through is optimal for its own size; when the next step does not fit, a last pass spends the remaining
bytes on the single upgrade (hull or not) that lowers KLD most, so the leftover is not wasted.
No heavy imports: this module is pure Python so the planner and tests can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from workbench.errors import WorkbenchError


class BudgetError(WorkbenchError):
    """The size budget cannot be met by any assignment of the candidate types."""


@dataclass(frozen=True)
class Option:
    type: str  # the candidate type asked for (the file may hold a fallback type for some tensors)
    bytes: int  # tensor bytes of the unit at this type
    kld: float  # mean KLD to the baseline when only this unit is at this type


def _hull(options: Sequence[Option]) -> list[Option]:
    """Options on the lower convex hull of (bytes, kld), cheapest first, KLD strictly falling."""
    by_size = sorted(options, key=lambda o: (o.bytes, o.kld))
    frontier: list[Option] = []
    for option in by_size:  # drop dominated options: more bytes without less KLD
        if frontier and option.kld >= frontier[-1].kld:
            continue
        if frontier and option.bytes == frontier[-1].bytes:
            continue
        frontier.append(option)
    hull: list[Option] = []
    for option in frontier:  # monotone chain: keep slopes increasing (less negative)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> option: never the best use of its bytes
            if (b.kld - a.kld) * (option.bytes - a.bytes) >= (option.kld - a.kld) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def smallest_total(table: Mapping[str, Sequence[Option]], fixed_bytes: int = 0) -> int:
    return fixed_bytes + sum(min(o.bytes for o in options) for options in table.values())


def check_budget(table: Mapping[str, Sequence[Option]], budget_bytes: int, fixed_bytes: int = 0,
                 smallest: str = "the smallest file the candidate types can make",
                 advice: str = "raise the target or add a smaller candidate type") -> None:
    """Refuse a budget that even the cheapest option of every unit exceeds, saying what the floor is.

    `smallest` names the floor and `advice` the way out, in the caller's terms (gguf-auto: candidate types)."""
    if not table:
        raise BudgetError("nothing to assign: no units")
    floor = smallest_total(table, fixed_bytes)
    if floor > budget_bytes:
        cheapest = sorted({min(options, key=lambda o: o.bytes).type for options in table.values()})
        raise BudgetError(
            f"a budget of {budget_bytes / 1e6:.2f} MB is below {smallest} "
            f"({floor / 1e6:.2f} MB with every unit at its cheapest type: {', '.join(cheapest)}); {advice}")


def greedy(table: Mapping[str, Sequence[Option]], budget_bytes: int, fixed_bytes: int = 0) -> dict[str, Option]:
    """One option per unit with total bytes (plus `fixed_bytes`, e.g. norms) at most `budget_bytes`, by the
    marginal KLD-per-byte walk. Raises BudgetError when even the cheapest option of every unit exceeds the budget.
    """
    check_budget(table, budget_bytes, fixed_bytes)
    floor = smallest_total(table, fixed_bytes)
    hulls = {unit: _hull(options) for unit, options in table.items()}
    position = {unit: 0 for unit in table}
    total = floor
    while True:
        best_unit, best_ratio = None, 0.0
        for unit, hull in hulls.items():
            i = position[unit]
            if i + 1 >= len(hull):
                continue
            step_bytes = hull[i + 1].bytes - hull[i].bytes
            if total + step_bytes > budget_bytes:
                continue
            ratio = (hull[i].kld - hull[i + 1].kld) / step_bytes
            if ratio > best_ratio:
                best_unit, best_ratio = unit, ratio
        if best_unit is None:
            break
        i = position[best_unit]
        total += hulls[best_unit][i + 1].bytes - hulls[best_unit][i].bytes
        position[best_unit] = i + 1
    chosen = {unit: hulls[unit][position[unit]] for unit in table}
    # Leftover bytes: the single upgrade (on the hull or not) that lowers KLD most and still fits, repeatedly.
    while True:
        best: tuple[float, str, Option] | None = None
        for unit, options in table.items():
            for option in options:
                gain = chosen[unit].kld - option.kld
                if gain > 0 and total - chosen[unit].bytes + option.bytes <= budget_bytes and (best is None or gain > best[0]):
                    best = (gain, unit, option)
        if best is None:
            break
        _, unit, option = best
        total += option.bytes - chosen[unit].bytes
        chosen[unit] = option
    return chosen


def total_bytes(choice: Mapping[str, Option], fixed_bytes: int = 0) -> int:
    return fixed_bytes + sum(o.bytes for o in choice.values())


def total_kld(choice: Mapping[str, Option]) -> float:
    return sum(o.kld for o in choice.values())


def optimal(table: Mapping[str, Sequence[Option]], budget_bytes: int, fixed_bytes: int = 0,
            cells: int = 200_000) -> dict[str, Option]:
    """The assignment of least total KLD within the budget: dynamic programming over a byte grid.

    Sizes are rounded up to the grid (budget / `cells` bytes, 1 byte for small budgets), so the result
    always fits; it is exactly optimal when the grid is 1 byte, otherwise within one grid step per unit
    (and never worse than the greedy walk, which is taken when the rounding made it better).
    """
    import numpy as np

    check_budget(table, budget_bytes, fixed_bytes)
    units = list(table)
    room = budget_bytes - fixed_bytes
    grid = max(1, -(-room // cells))
    size = room // grid + 1
    best = np.zeros(size)  # least KLD of the units so far within c grid cells
    picks = []
    for unit in units:
        options = list(table[unit])
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int16)
        for index, option in enumerate(options):
            w = -(-option.bytes // grid)
            if w >= size:
                continue
            candidate = best[: size - w] + option.kld
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            pick[w:][better] = index
        best = new
        picks.append((unit, options, pick))
    if not np.isfinite(best[-1]):  # the grid rounding ate the last bytes: fall back to the walk
        return greedy(table, budget_bytes, fixed_bytes)
    chosen: dict[str, Option] = {}
    cell = size - 1
    for unit, options, pick in reversed(picks):
        option = options[int(pick[cell])]
        chosen[unit] = option
        cell -= -(-option.bytes // grid)
    chosen = {unit: chosen[unit] for unit in units}
    if grid > 1:  # rounding to the grid can cost a step the walk, in exact bytes, still takes
        walk = greedy(table, budget_bytes, fixed_bytes)
        if total_kld(walk) < total_kld(chosen):
            return walk
    return chosen
