"""Memory bounds of the clip searches: the (trials, rows, columns) temporaries are formed a slice of
rows at a time, so a wide per-channel layer never needs trials x its weight at once, and the
chunked search gives exactly the one-piece result."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import quantize_llm.core.primitives as primitives
from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.spec import QuantSpec


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bits, sym, min_zero", [(4, False, 0), (3, True, 0), (4, False, 1)])
def test_chunked_clip_search_is_bit_identical(monkeypatch, weighted, bits, sym, min_zero) -> None:
    g = torch.Generator().manual_seed(bits + 10 * min_zero)
    w = torch.randn(301, 96, generator=g) * 0.05                         # 301: a partial last slice
    w[0, 0] = 1.0
    weights = torch.rand(96, generator=g) * 3 if weighted else None
    monkeypatch.setattr(primitives, "CLIP_TRIAL_ELEMENTS", 1 << 40)      # one piece
    whole = primitives.mse_params(w, bits, sym, min_zero, weights)
    for limit in (1, 81 * 96 * 7, 1 << 16):                              # a row, 7 rows, 8 rows at a time
        monkeypatch.setattr(primitives, "CLIP_TRIAL_ELEMENTS", limit)
        part = primitives.mse_params(w, bits, sym, min_zero, weights)
        assert torch.equal(whole[0], part[0]) and torch.equal(whole[1], part[1])


def test_wide_per_channel_mse_clip_stays_under_the_bound() -> None:
    """RTN --clip mse per channel on a wide layer: one-piece trials would be 81 x 8 MiB = 680 MiB."""
    w = torch.randn(256, 8192, generator=torch.Generator().manual_seed(0)) * 0.02
    spec = QuantSpec(bits=4, group_size=-1, sym=False, min_zero=1)
    with LargestTensor() as seen:
        rtn_quantize(w, spec, clip="mse")
    one_row = 81 * 8192 * 4                                                 # the least a slice can be
    assert seen.largest <= max(w.numel() * 4, 4 * primitives.CLIP_TRIAL_ELEMENTS, one_row)   # 8 MiB, not 680 MiB


@pytest.mark.parametrize("group_size, act_order", [(-1, False), (-1, True), (128, False)])
def test_gptq_clip_search_stays_under_the_bound(monkeypatch, group_size, act_order) -> None:
    """GPTQ's default mse clip on stacked rows: no temporary beyond the weight, the Hessian and the
    clip bound (lowered here to 1 MiB so the layer can stay small)."""
    monkeypatch.setattr(primitives, "CLIP_TRIAL_ELEMENTS", 1 << 18)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 512, generator=g) * 0.02                         # trials x w would be 162 MiB
    x = torch.randn(600, 512, generator=g)
    h = x.t() @ x
    spec = QuantSpec(bits=4, group_size=group_size, sym=False, act_order=act_order, min_zero=1)
    with LargestTensor() as seen:
        gptq_quantize(w, h, spec, GPTQOptions())
    weight_bytes = w.numel() * 4
    assert seen.largest <= max(weight_bytes, 4 * primitives.CLIP_TRIAL_ELEMENTS)


def test_output_energy_is_summed_a_slice_of_rows_at_a_time(monkeypatch) -> None:
    """tr(D H D^T) for GPTQ's output error: the one-piece value, with no temporary of D's size
    (405B's down_proj: D H alone was 3.5 GB beside an 11.3 GB Hessian)."""
    from quantize_llm.algorithms import solve

    g = torch.Generator().manual_seed(3)
    d = torch.randn(512, 256, generator=g, dtype=torch.float64)
    x = torch.randn(300, 256, generator=g, dtype=torch.float64)
    h = x.t() @ x
    want = float(((d @ h) * d).sum())
    monkeypatch.setattr(solve, "ENERGY_ELEMENTS", 256 * 16)                # 16 rows at a time
    with LargestTensor() as seen:
        got = solve.energy(d.to(torch.bfloat16), h.float())
    assert got == pytest.approx(float(((d.bfloat16().double() @ h) * d.bfloat16().double()).sum()), rel=1e-5)
    assert solve.energy(d, h) == pytest.approx(want, rel=1e-12)
    assert seen.largest <= max(h.float().numel() * 4, 16 * 256 * 4)      # the Hessian, else a slice
