"""Numerical failures: values beyond float16 where the formats store float16 (refused as the
checkpoint's fault, naming the module), overflowed calibration inputs, and Hessians that are not
positive definite (GPTQ's damping escalation, shared by every calibrated path)."""
from __future__ import annotations

import re

import pytest
import torch

from quantize_llm.algorithms.base import HessianNotFinite, LayerContext, NotPositiveDefinite
from quantize_llm.algorithms.gptq import GPTQ, GPTQOptions, gptq_quantize
from quantize_llm.algorithms.nf4 import NF4, NF4Options, nf4_gptq_quantize, nf4_quantize
from quantize_llm.algorithms.outlier import OutlierOptions, OutlierSplit, inverse_hessian_diagonal
from quantize_llm.algorithms.rtn import RTN, rtn_quantize
from quantize_llm.core.primitives import Float16Overflow, minmax_params, to_float16
from quantize_llm.core.qweight import Outliers
from quantize_llm.core.spec import QuantSpec
from quantize_llm.errors import CheckpointError, RunError
from quantize_llm.formats.gptq import GPTQFormat
from quantize_llm.formats.outlier import OutlierFormat

INT4 = QuantSpec(bits=4, group_size=32)
GPTQ4 = QuantSpec(method="gptq", bits=4, group_size=32)
NF4_SPEC = QuantSpec(method="nf4", format="bnb", codebook="nf4", blocksize=64, double_quant=True)
OUTLIER = QuantSpec(method="outlier", bits=4, group_size=32, sym=False, min_zero=1, format="outlier")


def weight(out_features: int = 16, in_features: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


def hessian(in_features: int = 64, seed: int = 1) -> torch.Tensor:
    x = torch.randn(256, in_features, generator=torch.Generator().manual_seed(seed))
    return x.t() @ x


def indefinite(in_features: int = 32) -> torch.Tensor:
    """Identity with one 2x2 block [[1, 1.5], [1.5, 1]] (eigenvalue -0.5): positive definite only
    once 0.5 or more is added to the diagonal, i.e. at damping 0.64 of the doubling 0.01 ... 1."""
    h = torch.eye(in_features, dtype=torch.float64)
    h[1, 2] = h[2, 1] = 1.5
    return h


def layer(weights: dict, prefix: str = "model.layers.3.", **kw) -> tuple[LayerContext, dict]:
    reports: dict = {}
    ctx = LayerContext(index=3, weights=weights, prefix=prefix,
                       report=lambda n, m: reports.setdefault(n, {}).update(m), **kw)
    return ctx, reports


# ---- the error itself ------------------------------------------------------------------------------

def test_the_overflow_says_what_and_where_and_its_fix_keeps_exactly_that_module_dense():
    w = torch.tensor([[0.1, 3e38], [0.2, 0.3]])
    with pytest.raises(Float16Overflow) as info:
        minmax_params(w, 4, True)
    exc = info.value
    assert exc.exit_code == 2 and isinstance(exc, CheckpointError)
    assert exc.message == "scale 4e+37 (from a weight of 3e+38) exceeds float16's 65504"
    named = exc.at("model.layers.1.self_attn.q_proj")
    assert named.message.startswith("model.layers.1.self_attn.q_proj: scale 4e+37")
    assert named.at("elsewhere") is named                       # named once
    pattern = re.search(r"--keep-dense '(.*)'", named.hint).group(1)
    assert re.search(pattern, "model.layers.1.self_attn.q_proj")
    for other in ("model.layers.11.self_attn.q_proj", "model.layers.1.self_attn.q_proj2", "model.layers.1xself_attn.q_proj"):
        assert not re.search(pattern, other)


def test_float16_boundary():
    """65504 is float16's largest value: kept. Anything beyond it, inf included, is refused."""
    assert to_float16(torch.tensor([65504.0, -65504.0]), "bias").tolist() == [65504.0, -65504.0]
    for bad in (65505.0, -1e6, float("inf")):
        with pytest.raises(Float16Overflow, match="bias"):
            to_float16(torch.tensor([1.0, bad]), "bias", "m")
    s, _ = minmax_params(torch.tensor([[-1.0, 65504.0 * 7.5]]), 4, True)   # scale exactly 65504
    assert float(s[0]) == 65504.0


# ---- RTN -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [3e38, 1e6])
def test_rtn_names_the_module(value):
    w = weight()
    w[3, 5] = value
    with pytest.raises(Float16Overflow) as info:
        rtn_quantize(w, INT4)
    assert info.value.value > 65504
    ctx, _ = layer({"mlp.down_proj": w})
    with pytest.raises(Float16Overflow, match=r"^model\.layers\.3\.mlp\.down_proj: scale \S+ \(from a weight of"):
        RTN(INT4).quantize_layer(ctx)


# ---- GPTQ: only a real Cholesky failure is a damping problem ------------------------------------

def test_gptq_stacked_solve_names_the_weight_that_overflows_not_damping():
    """q and k share an input and are solved stacked: the error names k (its own weight needs the
    scale), exits 2, and says nothing of --damp."""
    w_k = weight(seed=2)
    w_k[7, 40] = 1e6
    algo = GPTQ(GPTQ4)
    algo.hessians["q"] = hessian()
    ctx, _ = layer({"q": weight(), "k": w_k}, input_of={"q": "q", "k": "q"})
    with pytest.raises(Float16Overflow) as info:
        algo.quantize_layer(ctx)
    assert info.value.exit_code == 2
    assert info.value.message.startswith("model.layers.3.k: scale ")
    assert "damp" not in info.value.one_line()


def feedback_blowup() -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of at most 0.37, and a Hessian whose inverse's Cholesky factor U has U[0, 32:] /
    U[0, 0] ~ 1e6: column 0's rounding error, fed back, pushes columns 32.. to ~1e5."""
    u = torch.eye(64, dtype=torch.float64)
    u[0, 32:] = 2e6
    h = torch.linalg.inv(u.t() @ u)
    w = torch.full((4, 64), 0.1, dtype=torch.float64)
    w[:, 0] = 0.37
    return w, (h + h.t()) / 2


def test_gptq_feedback_that_leaves_float16_is_a_damping_problem():
    w, h = feedback_blowup()
    spec = QuantSpec(method="gptq", bits=2, group_size=32)
    with pytest.raises(Float16Overflow):                               # the solve itself meets it
        gptq_quantize(w, h, spec, GPTQOptions(damp=1e-24, clip="minmax"))
    algo = GPTQ(spec, GPTQOptions(damp=1e-24, clip="minmax"))
    algo.hessians["fc"] = h
    with pytest.raises(RunError) as info:
        algo.quantize_layer(layer({"fc": w})[0])
    assert info.value.exit_code == 1 and not isinstance(info.value, CheckpointError)
    assert info.value.one_line().startswith("model.layers.3.fc: the error feedback pushed a scale to ")
    assert "raise --damp (now 1e-24)" in info.value.one_line()
    qw, _ = gptq_quantize(w, h, spec, GPTQOptions(clip="minmax"))      # ... and damping tames it
    assert float(qw.scale.float().max()) < 1


def test_gptq_non_finite_hessian_is_the_inputs_not_damping():
    h = hessian()
    h[5, 5] = float("inf")
    with pytest.raises(HessianNotFinite):
        gptq_quantize(weight(), h, GPTQ4)
    algo = GPTQ(GPTQ4)
    algo.hessians["q"] = h
    with pytest.raises(CheckpointError) as info:
        algo.quantize_layer(layer({"q": weight(), "k": weight(seed=3)}, input_of={"q": "q", "k": "q"})[0])
    assert info.value.one_line().startswith("model.layers.3.q, model.layers.3.k: its calibration inputs overflow")
    assert "damp" not in info.value.one_line()


def test_gptq_cholesky_failure_after_escalation_names_the_module_and_asks_for_damping():
    algo = GPTQ(GPTQ4, GPTQOptions(damp=0.01, damp_max=0.1))
    algo.hessians["fc"] = -torch.eye(64)
    with pytest.raises(NotPositiveDefinite) as info:
        algo.quantize_layer(layer({"fc": weight()})[0])
    assert info.value.exit_code == 1
    assert info.value.one_line() == ("model.layers.3.fc: the Hessian (64x64) is not positive definite even with "
                                     "damping 0.1 (raise --damp (now 0.01) or use more calibration samples)")


# ---- NF4: the absmax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_absmax_beyond_float16_is_refused(double_quant):
    spec = NF4_SPEC.replace(double_quant=double_quant)
    w = weight()
    w[0, 0] = 65504.0
    assert float(nf4_quantize(w, spec).scale_tensor().max()) == pytest.approx(65504.0, rel=0.01)   # the limit: kept
    w[0, 0] = 65505.0
    with pytest.raises(Float16Overflow, match=r"absmax 6\.55e\+04"):
        nf4_quantize(w, spec)
    with pytest.raises(Float16Overflow, match="absmax"):
        nf4_gptq_quantize(w, hessian(), spec)
    w[0, 0] = 3e38
    with pytest.raises(Float16Overflow, match=r"^model\.layers\.3\.mlp\.up_proj: absmax 3e\+38"):
        NF4(spec).quantize_layer(layer({"mlp.up_proj": w})[0])
    algo = NF4(spec, NF4Options(rounding="gptq"))
    algo.hessians["mlp.up_proj"] = hessian()
    with pytest.raises(Float16Overflow, match=r"^model\.layers\.3\.mlp\.up_proj: absmax 3e\+38"):
        algo.quantize_layer(layer({"mlp.up_proj": w})[0])


def test_nf4_gptq_non_finite_hessian_names_the_module():
    algo = NF4(NF4_SPEC, NF4Options(rounding="gptq"))
    algo.hessians["fc"] = torch.full((64, 64), float("nan"))
    with pytest.raises(HessianNotFinite, match=r"^model\.layers\.3\.fc: its calibration inputs overflow"):
        algo.quantize_layer(layer({"fc": weight()})[0])


# ---- the outlier split: GPTQ's escalation for the score, values beyond float16 ----------------------

def test_outlier_score_escalates_damping_like_gptq():
    h = indefinite()
    diag, damp = inverse_hessian_diagonal(h, 0.01)
    assert damp == 0.64
    reference = torch.diagonal(torch.linalg.inv(h + 0.64 * torch.eye(32, dtype=torch.float64)))
    torch.testing.assert_close(diag.double(), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("inner", ["rtn", "gptq"])
def test_outlier_split_reports_the_damping_used(inner):
    algo = OutlierSplit(OUTLIER, OutlierOptions(inner=inner, calibrated=True, fraction=0.02))
    algo.hessians["fc"] = indefinite().float()
    ctx, reports = layer({"fc": weight(8, 32)})
    qw = algo.quantize_layer(ctx)["fc"]
    assert reports["fc"]["damp"] == 0.64 and qw.outliers.count == round(0.02 * 8 * 32)


def test_outlier_split_beyond_the_damping_bound_asks_for_damping():
    algo = OutlierSplit(OUTLIER, OutlierOptions(calibrated=True))
    algo.hessians["fc"] = -torch.eye(32)
    with pytest.raises(NotPositiveDefinite) as info:
        algo.quantize_layer(layer({"fc": weight(8, 32)})[0])
    assert info.value.one_line().startswith("model.layers.3.fc: the Hessian (32x32) is not positive definite")
    assert "raise --damp (now 0.01)" in info.value.one_line()


@pytest.mark.parametrize("options", [OutlierOptions(), OutlierOptions(inner="gptq"),
                                     OutlierOptions(mode="channel", fraction=1 / 32)], ids=["rtn", "gptq", "channel"])
def test_outlier_values_beyond_float16_are_refused(options):
    w = weight(8, 32)
    w[2, 0] = 1e6                     # the largest weight (weight mode), in the busiest column (channel mode)
    algo = OutlierSplit(OUTLIER, options)
    algo.hessians["fc"] = hessian(32)
    algo.act_max["fc"] = torch.linspace(9, 1, 32)
    with pytest.raises(Float16Overflow, match=r"^model\.layers\.3\.fc: outlier value 1e\+06 exceeds float16's 65504"):
        algo.quantize_layer(layer({"fc": w})[0])


# ---- the formats never write inf ---------------------------------------------------------------

def test_encoders_refuse_float16_infinities():
    qw = rtn_quantize(weight(32, 64), INT4)
    scale = qw.scale.clone()
    scale[1, 0] = float("inf")
    with pytest.raises(Float16Overflow, match="scale inf"):
        GPTQFormat.encode(qw.__class__(qw.codes, scale, qw.zero, None, INT4))
    spec = OUTLIER.replace(sym=True, min_zero=0)
    base = rtn_quantize(weight(32, 64), spec)
    outliers = Outliers("channel", torch.full((32, 1), float("inf"), dtype=torch.float16),
                        columns=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(Float16Overflow, match="outlier value inf"):
        OutlierFormat.encode(base.__class__(base.codes, base.scale, base.zero, None, spec, outliers=outliers))
