"""The shared error-feedback solve: its loop against a naive column-by-column float64 loop, its
output error against ||WX - QX|| / ||WX|| computed from X, and one set of solver options."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from quantize_llm.algorithms import solve
from quantize_llm.algorithms.awq import AWQOptions
from quantize_llm.algorithms.base import NotPositiveDefinite
from quantize_llm.algorithms.gptq import GPTQOptions
from quantize_llm.algorithms.nf4 import NF4Options
from quantize_llm.algorithms.outlier import OutlierOptions
from quantize_llm.algorithms.solve import Grid, cholesky_inverse_upper, feedback, output_error, solve_diagonal
from quantize_llm.errors import SpecError

STEP = 0.1


class Tenths(Grid):
    """Round to the nearest multiple of 0.1 (a grid independent of every method's)."""

    def __init__(self, w: torch.Tensor, fused: bool) -> None:
        self.fused = fused
        self.codes = torch.zeros_like(w)

    def round(self, j, col, current):
        self.codes[:, j] = torch.round(col / STEP)
        return self.codes[:, j] * STEP


def layer(out_features: int = 12, in_features: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, in_features, generator=g, dtype=torch.float64) @ (
        torch.eye(in_features, dtype=torch.float64) + 0.3 * torch.randn(in_features, in_features, generator=g,
                                                                           dtype=torch.float64))
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64) * 0.3
    return w, x


def naive(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor):
    """Frantar et al. 2023, Alg. 1 without lazy blocks: explicit inverse, one column at a time."""
    w = w.clone()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q, kept = torch.zeros_like(w), torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = torch.round(w[:, j] / STEP) * STEP
        kept[:, j] = torch.where(mask[:, j], w[:, j], 0.0)
        err = torch.where(mask[:, j], 0.0, (w[:, j] - q[:, j]) / u[j, j])
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return q, kept


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block_size", [1, 7, 40, 128])
def test_feedback_matches_the_columnwise_loop(fused: bool, block_size: int) -> None:
    w, x = layer()
    h = x.t() @ x
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.1
    want_q, want_kept = naive(w, h, mask)
    work = w.clone()
    grid = Tenths(w, fused)
    kept = feedback(work, torch.linalg.cholesky(torch.linalg.inv(h), upper=True), block_size, grid, mask)
    torch.testing.assert_close(grid.codes * STEP, want_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(kept, want_kept, rtol=0, atol=1e-12)


def test_output_error_is_the_relative_error_of_the_outputs() -> None:
    w, x = layer()
    q = torch.round(w / STEP) * STEP
    want = torch.linalg.norm(x @ w.t() - x @ q.t()) / torch.linalg.norm(x @ w.t())
    assert output_error(w, q, x.t() @ x) == pytest.approx(float(want), rel=1e-9)
    assert output_error(w.float(), q.float(), (x.t() @ x).float()) == pytest.approx(float(want), rel=1e-4)


def test_dead_inputs_count_as_a_unit_diagonal() -> None:
    h = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    diag, dead = solve_diagonal(h, torch.float64)
    assert dead.tolist() == [False, True, False]
    assert diag.tolist() == [2.0, 1.0, 3.0] and diag.dtype == torch.float64
    assert h[1, 1] == 0.0                                               # the Hessian is left alone


def _reference_upper(h: torch.Tensor, damp: float, perm: torch.Tensor | None) -> torch.Tensor:
    """The definition in float64: U upper with U^T U = (P H P^T, dead diagonal 1, + damp mean I)^-1."""
    h = h.double().clone()
    if perm is not None:
        h = h[perm][:, perm]
    d = torch.diagonal(h)
    d[d == 0] = 1.0
    d += damp * float(d.mean())
    return torch.linalg.cholesky(torch.linalg.inv(h), upper=True)


@pytest.mark.parametrize("permuted", [False, True])
def test_inverse_factor_in_place_matches_the_definition(monkeypatch: pytest.MonkeyPatch, permuted: bool) -> None:
    monkeypatch.setattr(solve, "COPY_ELEMENTS", 7 * 40)   # copied and checked 7 rows at a time
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    x[:, 5] = 0.0                                                       # an input that never fired
    h = x.t() @ x
    before = h.clone()
    perm = torch.randperm(40, generator=g) if permuted else None
    upper, damp = cholesky_inverse_upper(h, 0.01, 1.0, perm)
    assert damp == 0.01
    assert torch.equal(h, before)
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper, _reference_upper(h, 0.01, perm), rtol=1e-9, atol=1e-12)
    up32, _ = cholesky_inverse_upper(h.float(), 0.01, 1.0, perm, torch.float64)   # float32 statistics, float64 solve
    assert up32.dtype == torch.float64
    torch.testing.assert_close(up32, _reference_upper(h.float(), 0.01, perm), rtol=1e-9, atol=1e-12)


def test_inverse_factor_doubles_damping_until_positive_definite() -> None:
    h = torch.tensor([[1.0, 1.6], [1.6, 1.0]], dtype=torch.float64)   # eigenvalues 2.6 and -0.6; mean diag 1
    upper, damp = cholesky_inverse_upper(h, 0.25, 4.0)
    assert damp == 1.0                                                  # 0.25 and 0.5 fail
    torch.testing.assert_close(upper, _reference_upper(h, 1.0, None))
    with pytest.raises(NotPositiveDefinite):
        cholesky_inverse_upper(h, 0.25, 0.5)


SOLVER_OPTIONS = [GPTQOptions, AWQOptions, NF4Options, OutlierOptions]


@pytest.mark.parametrize("kwargs, message", [
    ({"damp": 0}, "--damp 0 must be in (0, 1] (0.01 is typical)"),
    ({"damp": 1.5}, "--damp 1.5 must be in (0, 1] (0.01 is typical)"),
    ({"damp": float("nan")}, "--damp nan must be in (0, 1] (0.01 is typical)"),
    ({"block_size": 0}, "--block-size 0 must be at least 1 (128 is typical)"),
])
@pytest.mark.parametrize("cls", SOLVER_OPTIONS, ids=lambda c: c.__name__)
def test_every_method_bounds_the_solver_options_alike(cls, kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        cls(**kwargs)
    assert info.value.one_line() == message


@pytest.mark.parametrize("cls", SOLVER_OPTIONS, ids=lambda c: c.__name__)
def test_the_bounds_are_inclusive_at_one(cls) -> None:
    assert cls(damp=1.0, block_size=1).damp == 1.0


def test_damp_max_lowers_the_bound_where_it_is_an_option() -> None:
    for cls in (GPTQOptions, NF4Options):
        with pytest.raises(SpecError, match=r"^--damp 0\.2 must be in \(0, 0\.1\]"):
            cls(damp=0.2, damp_max=0.1)


def test_option_names_and_defaults_are_the_recipe_keys() -> None:
    """Recipes and the options recorded in config.json use these names: they must not move."""
    def fields(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}
    assert fields(GPTQOptions) == {"block_size": 128, "damp": 0.01, "damp_max": 1.0, "static_groups": False,
                                   "true_sequential": True, "clip": "mse", "qep": 0.0}
    assert fields(NF4Options) == {"rounding": "nearest", "block_size": 128, "damp": 0.01, "damp_max": 1.0,
                                  "true_sequential": True}
    assert fields(AWQOptions) == {"grid": 20, "clip": True, "clip_grid": 20, "max_shrink": 0.5, "search_samples": 16,
                                  "duo_scaling": False, "then": "rtn", "damp": 0.01, "block_size": 128,
                                  "true_sequential": True}
    assert fields(OutlierOptions) == {"inner": "rtn", "mode": "weight", "fraction": None, "threshold": None,
                                      "calibrated": False, "clip": "minmax", "damp": 0.01, "block_size": 128,
                                      "true_sequential": True}
    assert list(fields(GPTQOptions)) == ["block_size", "damp", "damp_max", "static_groups", "true_sequential", "clip",
                                         "qep"]


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("to_file", [False, True])
def test_inverse_factor_overwriting_the_hessian_matches_the_copy(monkeypatch: pytest.MonkeyPatch, permuted: bool,
                                                                 to_file: bool) -> None:
    monkeypatch.setattr(solve, "SPILL_BYTES", 0 if to_file else 2 ** 40)   # the copy kept in a file, or a clone
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0
    h = x.t() @ x
    h[0, 0] -= 50.0                                                     # indefinite: damping has to grow
    perm = torch.randperm(12, generator=g) if permuted else None
    want, want_damp = cholesky_inverse_upper(h, 0.01, 64.0, perm)
    consumed = h.clone()
    got, damp = cholesky_inverse_upper(consumed, 0.01, 64.0, perm, overwrite=True)
    assert damp == want_damp > 0.01                                     # retried from the kept copy
    assert got.data_ptr() == consumed.data_ptr()                        # in the Hessian's own memory
    assert torch.equal(got, want)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gptq_output_error_without_the_hessian_matches_the_definition(act_order: bool, dtype: torch.dtype) -> None:
    from quantize_llm.algorithms.gptq import gptq_quantize
    from quantize_llm.core.spec import QuantSpec

    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 64, dtype=torch.float64)
    x[:, 7] = 0.0                                                       # a dead input
    h = (x.t() @ x).to(dtype)
    w = (torch.randn(24, 64, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    spec = QuantSpec(bits=3, group_size=16, act_order=act_order)
    qw, stats = gptq_quantize(w, h, spec)
    kept = h.clone()
    qw2, stats2 = gptq_quantize(w, kept, spec, own_hessian=True)
    assert torch.equal(qw.codes, qw2.codes) and torch.equal(qw.grid_scale, qw2.grid_scale)
    assert not torch.equal(kept, h)                                     # its memory held the factors
    q = qw.dequantize(torch.float64)
    d = w.double() - q
    d[:, stats.dead] = 0.0
    want = output_error(w.double(), q, h.double())                      # ||WX - QX|| / ||WX|| from H itself
    for s in (stats, stats2):
        assert s.row_error is not None
        got = math.sqrt(solve.solve_energy(s.row_error.double(), s.ridge, d)
                        / solve.energy(w.double(), h.double()))
        assert got == pytest.approx(want, rel=1e-9 if dtype == torch.float64 else 2e-4)


def test_squared_residual_in_row_slices_is_the_whole_sum(monkeypatch):
    from quantize_llm.algorithms.rtn import rtn_quantize
    from quantize_llm.core.spec import QuantSpec

    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 64, generator=g)
    qw = rtn_quantize(w, QuantSpec(method="rtn", bits=3, group_size=32))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 40]] = True
    d = (w - qw.dequantize(torch.float32)).double()
    d[:, dead] = 0.0
    monkeypatch.setattr(solve, "RESIDUAL_ELEMENTS", 64 * 5)               # 5 rows a slice: 8 slices
    assert solve.squared_residual(w, qw.dequantize_rows, dead) == pytest.approx(float((d * d).sum()), rel=1e-6)
    assert solve.squared_residual(w[10:20], lambda a, b: qw.dequantize_rows(10 + a, 10 + b), None) == \
        pytest.approx(float(((w[10:20] - qw.dequantize(torch.float32)[10:20]).double() ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_spilled_copy_comes_back_bit_for_bit(monkeypatch, dtype):
    monkeypatch.setattr(solve, "SPILL_BYTES", 0)
    t = torch.randn(33, 33, generator=torch.Generator().manual_seed(2), dtype=dtype)
    spill = solve.Spill(t)
    assert spill.path is not None and os.path.getsize(spill.path) == t.numel() * t.element_size()
    into = torch.zeros_like(t)
    spill.restore(into)
    assert torch.equal(into, t)
    strided = torch.zeros(33, 66, dtype=dtype)[:, ::2]                  # not contiguous: copied in
    spill.restore(strided)
    assert torch.equal(strided, t)
    path = spill.path
    spill.close()
    assert not os.path.exists(path)
