"""The budget allocator (core/allocate.py): exact optimum, the budget met, better than uniform."""
from __future__ import annotations

import itertools
import random

import pytest

from quantize_llm.core.allocate import lagrangian_bound, solve
from quantize_llm.errors import SpecError


def brute(items, budget):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in items]):
        size = sum(items[m][k][0] for m, k in enumerate(choice))
        cost = sum(items[m][k][1] for m, k in enumerate(choice))
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(30))
def test_exact_optimum_on_random_problems(seed):
    rng = random.Random(seed)
    items = [[(rng.randint(1, 40) * 7, rng.random() * 10) for _ in range(rng.randint(1, 4))]
             for _ in range(rng.randint(1, 6))]
    smallest = sum(min(s for s, _ in o) for o in items)
    largest = sum(max(s for s, _ in o) for o in items)
    budget = rng.randint(smallest, largest)
    a = solve(items, budget)
    assert a.exact and a.bits <= budget
    assert a.bits == sum(items[m][k][0] for m, k in enumerate(a.choice))
    assert a.cost == pytest.approx(brute(items, budget))
    assert lagrangian_bound(items, budget) <= a.cost + 1e-9


def test_beats_every_uniform_setting_of_no_larger_size():
    # four modules, three settings (2/3/4 bits, sizes in bits); module 0 is very sensitive, module 3 hardly.
    sizes = {2: 100, 3: 150, 4: 200}
    sens = [100.0, 10.0, 1.0, 0.1]
    err = {2: 16.0, 3: 4.0, 4: 1.0}       # error quarters per added bit
    items = [[(sizes[b], s * err[b]) for b in (2, 3, 4)] for s in sens]
    budget = 4 * sizes[3]                  # the size of uniform 3-bit
    a = solve(items, budget)
    # the known optimum: 4 bits where it matters most, 2 bits for the least sensitive
    assert a.choice == (2, 2, 0, 0)        # 4, 4, 2, 2 bits: 200+200+100+100 = 600
    assert a.bits == budget
    for b in (2, 3, 4):
        uniform_size = 4 * sizes[b]
        uniform_cost = sum(s * err[b] for s in sens)
        if uniform_size <= budget:
            assert a.cost < uniform_cost


def test_coarse_unit_still_fits_and_is_near_the_bound():
    rng = random.Random(1)
    items = [[(rng.randint(10_000, 90_000) + 1, rng.random()) for _ in range(5)] for _ in range(40)]
    budget = sum(sorted(s for s, _ in o)[2] for o in items)
    a = solve(items, budget, max_units=500)
    assert not a.exact and a.bits <= budget
    assert a.bound <= a.cost
    exact = solve(items, budget, max_units=10**7)
    assert exact.cost <= a.cost


def test_budget_below_the_smallest_setting_is_refused():
    with pytest.raises(SpecError, match="below the smallest"):
        solve([[(10, 1.0)], [(10, 1.0)]], 19)
