"""GPTQ's solve against a float64 column-by-column reference, and its error against RTN."""
import pytest
import torch
from reference import gptq_f64, make_layer

from quantize_llm.algorithms.base import NotPositiveDefinite
from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
from quantize_llm.algorithms.rtn import rtn_quantize
from quantize_llm.core.spec import QuantSpec


@pytest.mark.parametrize("bits,group_size,sym,act_order,static", [
    (4, 32, True, False, False), (4, 32, False, False, False), (3, 64, False, False, False),
    (8, -1, True, False, False), (4, 32, True, True, False), (3, 32, False, True, False),
    (4, 32, False, True, True), (2, 48, True, False, False), (4, 40, False, True, False)])
def test_matches_columnwise_float64_reference(bits, group_size, sym, act_order, static):
    w, x = make_layer(48, 160)
    h = x.double().t() @ x.double()
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, min_zero=0 if sym else 1)
    got, stats = gptq_quantize(w.double(), h, spec, GPTQOptions(block_size=32, static_groups=static, clip="minmax"))
    want, g_idx = gptq_f64(w, h, bits, group_size, sym, min_zero=spec.min_zero, act_order=act_order,
                           static_groups=static)
    torch.testing.assert_close(got.dequantize(torch.float64), want, rtol=0, atol=1e-9)
    assert got.group_index().tolist() == g_idx
    assert stats.damp == 0.01


def test_float32_path_agrees_with_float64():
    w, x = make_layer(64, 128)
    spec = QuantSpec(bits=4, group_size=32, sym=False, min_zero=1)
    a, _ = gptq_quantize(w, x.t() @ x, spec, GPTQOptions(clip="minmax"))
    b, _ = gptq_quantize(w.double(), x.double().t() @ x.double(), spec, GPTQOptions(clip="minmax"))
    assert (a.codes != b.codes).float().mean() < 0.01


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (4, -1)])
def test_output_error_below_rtn(bits, group_size):
    w, x = make_layer(64, 128)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=False, min_zero=1)
    g, _ = gptq_quantize(w, x.t() @ x, spec)
    r = rtn_quantize(w, spec)
    ref = x @ w.t()
    err_g = torch.linalg.norm(x @ g.dequantize().t() - ref)
    err_r = torch.linalg.norm(x @ r.dequantize().t() - ref)
    assert err_g < 0.8 * err_r


def test_act_order_groups_have_group_size_members_and_partial_last():
    w, x = make_layer(32, 96)
    spec = QuantSpec(bits=4, group_size=40, sym=True, act_order=True)
    qw, _ = gptq_quantize(w, x.t() @ x, spec)
    counts = torch.bincount(qw.g_idx.long(), minlength=3).tolist()
    assert counts == [40, 40, 16]
    assert qw.g_idx.dtype == torch.int32 and qw.scale.shape == (32, 3)
    # highest-activation columns go first: group 0 holds the 40 largest diagonals
    diag = torch.diagonal(x.t() @ x)
    assert set(torch.nonzero(qw.g_idx == 0).flatten().tolist()) == set(torch.argsort(diag, descending=True)[:40].tolist())


def test_dead_columns_and_damping_escalation():
    w, x = make_layer(32, 64)
    x[:, 5] = 0                                            # an input that never fires
    h = x.t() @ x
    qw, stats = gptq_quantize(w, h, QuantSpec(bits=4, group_size=32))
    assert stats.dead_columns == 1 and torch.all(qw.dequantize()[:, 5] == 0)
    singular = -torch.eye(64)                              # negative definite: needs heavy damping
    singular[0, 0] = 50.0
    with pytest.raises(NotPositiveDefinite, match="not positive definite"):
        gptq_quantize(w, singular, QuantSpec(bits=4, group_size=32), GPTQOptions(damp_max=0.1))
    rank1 = torch.outer(torch.arange(1.0, 65.0), torch.arange(1.0, 65.0))  # PSD, rank 1: the first damping suffices
    _, stats = gptq_quantize(w, rank1, QuantSpec(bits=4, group_size=32))
    assert stats.damp == 0.01
    # eigenvalue -0.5 (the 2x2 block [[1, 1.5], [1.5, 1]]), mean diagonal 1: positive definite from
    # damping 0.5 on, so the doubling 0.01, 0.02, ... stops at 0.64
    indefinite = torch.eye(64)
    indefinite[1, 2] = indefinite[2, 1] = 1.5
    _, stats = gptq_quantize(w, indefinite, QuantSpec(bits=4, group_size=32))
    assert stats.damp == 0.64


def test_inputs_are_not_modified():
    w, x = make_layer(32, 64)
    h = x.t() @ x
    w0, h0 = w.clone(), h.clone()
    gptq_quantize(w, h, QuantSpec(bits=3, group_size=32, act_order=True))
    assert torch.equal(w, w0) and torch.equal(h, h0)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (3, 48, True)])
def test_mse_clip_matches_reference_with_weighted_brute_force(bits, group_size, act_order):
    w, x = make_layer(24, 96)
    h = x.double().t() @ x.double()
    spec = QuantSpec(bits=bits, group_size=group_size, sym=False, act_order=act_order, min_zero=1)
    got, _ = gptq_quantize(w.double(), h, spec, GPTQOptions(block_size=32, clip="mse"))
    want, _ = gptq_f64(w, h, bits, group_size, False, min_zero=1, act_order=act_order, clip="mse")
    torch.testing.assert_close(got.dequantize(torch.float64), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (3, 48, True)])
def test_feedback_clip_matches_reference(bits, group_size, act_order):
    """--clip feedback against a float64 reference that tries each range with full GPTQ updates."""
    w, x = make_layer(24, 96)
    h = x.double().t() @ x.double()
    spec = QuantSpec(bits=bits, group_size=group_size, sym=False, act_order=act_order, min_zero=1)
    got, _ = gptq_quantize(w.double(), h, spec, GPTQOptions(block_size=32, clip="feedback"))
    want, _ = gptq_f64(w, h, bits, group_size, False, min_zero=1, act_order=act_order, clip="feedback")
    torch.testing.assert_close(got.dequantize(torch.float64), want, rtol=0, atol=1e-9)
    mse, _ = gptq_quantize(w.double(), h, spec, GPTQOptions(block_size=32, clip="mse"))
    assert not torch.equal(got.dequantize(torch.float64), mse.dequantize(torch.float64))   # it chose otherwise


def test_feedback_clip_lowers_output_error_and_is_gptq_only():
    w, x = make_layer(128, 256)
    h = x.t() @ x
    spec = QuantSpec(bits=3, group_size=64, sym=False, min_zero=1)
    err = {}
    for clip in ("mse", "feedback"):
        qw, _ = gptq_quantize(w, h, spec, GPTQOptions(clip=clip))
        err[clip] = float(torch.linalg.norm(x @ (qw.dequantize() - w).t()))
    assert err["feedback"] < err["mse"]
    from quantize_llm.algorithms.rtn import RTNOptions
    from quantize_llm.errors import SpecError
    with pytest.raises(SpecError, match="--clip feedback is not known"):
        RTNOptions(clip="feedback")
    with pytest.raises(SpecError, match="--clip nearest is not known") as exc:
        GPTQOptions(clip="nearest")
    assert "minmax, mse, feedback" in (exc.value.hint or "")


def test_mse_clip_lowers_output_error():
    w, x = make_layer(64, 128)
    w[:, 3] *= 8                                            # outlier weights stretch every min-max range
    spec = QuantSpec(bits=3, group_size=64, sym=False, min_zero=1)
    h = x.t() @ x
    err = {}
    for clip in ("minmax", "mse"):
        qw, _ = gptq_quantize(w, h, spec, GPTQOptions(clip=clip))
        err[clip] = torch.linalg.norm(x @ (qw.dequantize() - w).t())
    assert err["mse"] < err["minmax"]
