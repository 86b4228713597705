"""Choosing one setting per module under a size budget: a multiple-choice knapsack.

Each module m has options k with an exact size s_mk (bits, an integer) and a predicted loss
c_mk; `solve` picks one option per module so that sum s <= budget and sum c is as small as it can
be. Dynamic programming over the budget does it exactly when the sizes, less each module's
smallest, share a unit that divides the budget into at most `max_units` steps (the usual case:
modules of one shape differ by the same multiples); otherwise sizes are rounded *up* to a coarser
unit, so the choice still fits the budget, and the Lagrangian lower bound says how far from the
optimum it can be. No hand rules: the costs decide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpecError


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]    # the option picked for each module
    bits: int                  # sum of the picked sizes (exact)
    cost: float                # sum of the picked costs
    exact: bool                # the dynamic program ran on the exact sizes: `cost` is the optimum
    bound: float               # a lower bound on the optimum (Lagrangian dual); == cost when exact


def _pareto(options: list[tuple[int, float]]) -> list[int]:
    """Indices of the options no other option beats in both size and cost (ties: the first)."""
    order = sorted(range(len(options)), key=lambda k: (options[k][0], options[k][1], k))
    keep: list[int] = []
    best = math.inf
    for k in order:
        if options[k][1] < best:
            keep.append(k)
            best = options[k][1]
    return keep


def lagrangian_bound(items: list[list[tuple[int, float]]], budget: int, steps: int = 60) -> float:
    """max over lambda >= 0 of sum_m min_k (c_mk + lambda s_mk) - lambda budget: a lower bound on
    the optimum of the knapsack (the dual of its relaxation), found by bisection on lambda."""
    def dual(lam: float) -> tuple[float, int]:
        value, size = 0.0, 0
        for options in items:
            s, c = min(options, key=lambda o: o[1] + lam * o[0])
            value += c + lam * s
            size += s
        return value - lam * budget, size

    lo, hi = 0.0, 1.0
    while dual(hi)[1] > budget and hi < 1e30:
        hi *= 4
    best = max(dual(0.0)[0], dual(hi)[0])
    for _ in range(steps):
        mid = (lo + hi) / 2
        value, size = dual(mid)
        best = max(best, value)
        if size > budget:
            lo = mid
        else:
            hi = mid
    return best


def solve(items: list[list[tuple[int, float]]], budget: int, max_units: int = 200_000) -> Allocation:
    """The options (size in bits, cost) of each module -> the cheapest choice within `budget` bits
    (see the module docstring). SpecError when even the smallest options do not fit."""
    if not items or any(not options for options in items):
        raise ValueError("every module needs at least one option")
    base = sum(min(s for s, _ in options) for options in items)
    if base > budget:
        raise SpecError(f"the budget ({budget / 8 / 1e6:.3f} MB of quantized weights) is below the smallest "
                        f"setting's size ({base / 8 / 1e6:.3f} MB)", "raise --target-bpw / --target-size")
    kept = [_pareto(options) for options in items]
    mins = [min(s for s, _ in options) for options in items]
    room = budget - base
    steps = [items[m][k][0] - mins[m] for m in range(len(items)) for k in kept[m]]
    unit = math.gcd(*steps) if any(steps) else 1
    unit = max(unit, 1)
    exact = room // unit <= max_units
    if not exact:
        unit = -(-room // max_units)
    capacity = room // unit
    inf = math.inf
    best = torch.zeros(capacity + 1, dtype=torch.float64)   # least cost of the modules so far within c units
    picks = torch.zeros(len(items), capacity + 1, dtype=torch.int16)
    for m, options in enumerate(items):
        new = torch.full((capacity + 1,), inf, dtype=torch.float64)
        pick = torch.zeros(capacity + 1, dtype=torch.int16)
        for k in kept[m]:
            w = -(-(options[k][0] - mins[m]) // unit)     # rounded up: a choice that fits here fits for real
            if w > capacity:
                continue
            cand = torch.full((capacity + 1,), inf, dtype=torch.float64)
            cand[w:] = best[:capacity + 1 - w] + options[k][1]
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best, picks[m] = new, pick
    c = capacity
    choice = [0] * len(items)
    for m in range(len(items) - 1, -1, -1):
        k = int(picks[m, c])
        choice[m] = k
        c -= -(-(items[m][k][0] - mins[m]) // unit)
    bits = sum(items[m][k][0] for m, k in enumerate(choice))
    cost = sum(items[m][k][1] for m, k in enumerate(choice))
    bound = cost if exact else min(cost, lagrangian_bound(items, budget))
    return Allocation(tuple(choice), bits, cost, exact, bound)
