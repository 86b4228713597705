"""The outlier split against independent references: selection, the masked inner algorithms, the
sparse product, and the layout's round trip."""
from __future__ import annotations

import pytest
import torch
from reference import dequant_f64, gptq_f64, rtn_f64

from quantize_llm.algorithms.base import LayerContext
from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
from quantize_llm.algorithms.outlier import (
    OutlierOptions,
    OutlierSplit,
    channel_mask,
    to_outliers,
    top_fraction,
    weight_mask,
)
from quantize_llm.core.qweight import Outliers
from quantize_llm.core.spec import MethodRecord, QuantSpec
from quantize_llm.errors import SpecError
from quantize_llm.formats.base import ConfigFacts
from quantize_llm.formats.outlier import OutlierFormat
from quantize_llm.runtime.qlinear import OutlierLinear, sparse_matmul

GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


def weight_and_hessian(out_features: int = 24, in_features: int = 96, seed: int = 0):
    g = GEN(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    w[torch.rand(out_features, in_features, generator=g) < 0.01] *= 12           # heavy tails
    x = torch.randn(400, in_features, generator=g) * torch.linspace(0.2, 2.0, in_features)
    return w, x.t() @ x


def run(spec: QuantSpec, options: OutlierOptions, w: torch.Tensor, h: torch.Tensor | None):
    algo = OutlierSplit(spec, options)
    if h is not None:
        algo.hessians["fc"] = h.clone()
    if options.mode == "channel":
        algo.act_max["fc"] = torch.linspace(0.5, 10, w.shape[1])
    reports = {}
    qw = algo.quantize_layer(LayerContext(index=0, weights={"fc": w}, report=lambda n, m: reports.update(m)))["fc"]
    return qw, reports


@pytest.mark.parametrize("fraction", [0.0, 0.0025, 0.01, 0.05])
def test_fraction_selected_equals_the_request(fraction: float) -> None:
    w, h = weight_and_hessian()
    spec = QuantSpec(method="outlier", bits=3, group_size=32, sym=False, min_zero=1, format="outlier")
    qw, reports = run(spec, OutlierOptions(fraction=fraction), w, None)
    assert qw.outliers.count == round(fraction * w.numel()) == reports["outliers"]


def test_magnitude_score_keeps_the_largest_weights() -> None:
    w, _ = weight_and_hessian()
    mask = weight_mask(w, ("fraction", 0.02), None)
    kept = w.abs()[mask]
    assert kept.min() >= w.abs()[~mask].max()


def test_inverse_hessian_score_prefers_busy_inputs() -> None:
    """Equal weights: the one on the input with the smallest [H^-1]_jj (most energy) is kept."""
    w = torch.ones(1, 8)
    hinv_diag = torch.tensor([4.0, 3, 2, 0.5, 1, 6, 7, 8])
    mask = weight_mask(w, ("fraction", 1 / 8), hinv_diag)
    assert mask[0].nonzero().flatten().tolist() == [3]


def test_thresholds() -> None:
    act = torch.tensor([0.5, 6.0, 2.0, 7.5, 5.99])
    assert channel_mask(act, ("threshold", 6.0)).tolist() == [False, True, False, True, False]
    # round(0.4 x 5) = 2 columns: the two busiest, 7.5 and 6.0
    assert channel_mask(act, ("fraction", 0.4)).tolist() == [False, True, False, True, False]
    w = torch.tensor([[1.0, -1.0, 1.0, 10.0]])
    # sensitivity w^2 against X^2 x mean(w^2) = X^2 x 25.75: only the 10 passes X = 1.5
    assert weight_mask(w, ("threshold", 1.5), None).tolist() == [[False, False, False, True]]


def test_top_fraction_ties_take_the_first() -> None:
    assert top_fraction(torch.ones(10), 0.3).nonzero().flatten().tolist() == [0, 1, 2]


def test_rtn_inner_against_float64_reference() -> None:
    """Codes and ranges of the rest as RTN of the weight with the outliers set to 0 (left out of
    every min/max, since 0 is always in the range); outliers exact in float16; W = codes + outliers."""
    w, _ = weight_and_hessian()
    spec = QuantSpec(method="outlier", bits=3, group_size=32, sym=False, min_zero=1, format="outlier")
    qw, _ = run(spec, OutlierOptions(fraction=0.02), w, None)
    mask = qw.outliers.mask(qw.shape)
    codes, scale, zero, _ = rtn_f64(torch.where(mask, 0.0, w), 3, 32, False, 1)
    ref_dense = dequant_f64(codes, scale, zero, torch.arange(96) // 32)
    dense = (qw.dequantize(torch.float64) - qw.outliers.dense(qw.shape, torch.float64))
    torch.testing.assert_close(dense, ref_dense, rtol=0, atol=1e-12)
    assert bool((dense[mask] == 0).all())                      # the codes hold the zero point there
    assert torch.equal(qw.outliers.dense(qw.shape)[mask], w[mask].half().float())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_inner_against_float64_reference(act_order: bool) -> None:
    w, h = weight_and_hessian()
    spec = QuantSpec(method="outlier", bits=3, group_size=32, sym=False, min_zero=1, act_order=act_order,
                     format="outlier")
    qw, _ = run(spec, OutlierOptions(inner="gptq", fraction=0.02, clip="minmax"), w.double(), h.double())
    mask = qw.outliers.mask(qw.shape)
    assert int(mask.sum()) == round(0.02 * w.numel())
    ref, _ = gptq_f64(w, h, 3, 32, False, min_zero=1, act_order=act_order, mask=mask)
    got_dense = qw.dequantize(torch.float64) - qw.outliers.dense(qw.shape, torch.float64)
    torch.testing.assert_close(got_dense, torch.where(mask, 0.0, ref), rtol=0, atol=1e-9)
    # the kept values carry the error propagated into them, stored in float16
    torch.testing.assert_close(qw.outliers.dense(qw.shape, torch.float64)[mask], ref[mask].half().double(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_inner_scores_from_its_own_factor_and_reports_the_defined_error(act_order: bool) -> None:
    """float32, Hessian read by this Linear only: the kept weights are the top w^2 / [H'^-1]_jj with
    H' = H + 0.01 mean(diag H) I inverted in float64, the Hessian is consumed by the solve (nothing
    n x n beside it), and the reported error is ||(W - Q) X|| / ||W X|| from the original H."""
    w, h = weight_and_hessian(32, 128, seed=3)
    spec = QuantSpec(method="outlier", bits=3, group_size=32, sym=False, min_zero=1, act_order=act_order,
                     format="outlier")
    algo = OutlierSplit(spec, OutlierOptions(inner="gptq", fraction=0.03, clip="minmax"))
    algo.hessians["fc"] = h.clone()
    reports: dict = {}
    qw = algo.quantize_layer(LayerContext(index=0, weights={"fc": w}, report=lambda n, m: reports.update(m)))["fc"]
    assert "fc" not in algo.hessians
    h64 = h.double()
    damped = h64 + 0.01 * h64.diagonal().mean() * torch.eye(128, dtype=torch.float64)
    score = w.double() ** 2 / torch.linalg.inv(damped).diagonal()
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[score.flatten().topk(round(0.03 * w.numel())).indices] = True
    assert torch.equal(qw.outliers.mask(qw.shape), expected.view_as(w))
    d = w.double() - qw.dequantize(torch.float64)
    defined = ((d @ h64) * d).sum() / ((w.double() @ h64) * w.double()).sum()
    assert reports["rel_error"] == pytest.approx(float(defined.sqrt()), rel=1e-4)


@pytest.mark.parametrize("inner", ["rtn", "gptq"])
def test_fraction_zero_is_the_inner_algorithm_bit_for_bit(inner: str) -> None:
    from quantize_llm.algorithms.rtn import rtn_quantize

    w, h = weight_and_hessian()
    spec = QuantSpec(method="outlier", bits=4, group_size=32, sym=False, min_zero=1, format="outlier")
    qw, _ = run(spec, OutlierOptions(inner=inner, fraction=0.0, clip="mse" if inner == "gptq" else "minmax"), w, h)
    plain = rtn_quantize(w, spec) if inner == "rtn" else gptq_quantize(w, h, spec, GPTQOptions())[0]
    assert qw.outliers.count == 0
    for field in ("codes", "scale", "zero"):
        assert torch.equal(getattr(qw, field), getattr(plain, field)), field


def test_channel_mode_keeps_whole_columns() -> None:
    w, h = weight_and_hessian()
    spec = QuantSpec(method="outlier", bits=8, group_size=-1, sym=True, format="outlier")
    qw, _ = run(spec, OutlierOptions(mode="channel", threshold=9.0), w, h)    # act_max = linspace(0.5, 10, 96)
    expected = (torch.linspace(0.5, 10, 96) >= 9.0).nonzero().flatten()
    assert qw.outliers.mode == "channel" and torch.equal(qw.outliers.columns.long(), expected)
    torch.testing.assert_close(qw.outliers.values.float(), w[:, expected].half().float(), rtol=0, atol=0)
    rest = torch.ones(96, dtype=torch.bool)
    rest[expected] = False
    codes, scale, zero, _ = rtn_f64(torch.where(rest, w, 0.0), 8, -1, True, 0)
    torch.testing.assert_close(qw.dequantize(torch.float64)[:, rest],
                               dequant_f64(codes, scale, zero, torch.zeros(96, dtype=torch.long))[:, rest],
                               rtol=0, atol=1e-12)


def test_sparse_matmul_equals_dense_reference() -> None:
    g = GEN(1)
    dense = torch.zeros(40, 70, dtype=torch.float64)
    mask = torch.rand(40, 70, generator=g) < 0.05
    dense[mask] = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64)
    o = to_outliers(dense, mask, "weight")
    assert o.col_idx.dtype == torch.int16 and o.row_ptr.dtype == torch.int32
    x = torch.randn(9, 70, generator=g)
    expected = x.double() @ o.dense((40, 70), torch.float64).t()
    torch.testing.assert_close(sparse_matmul(x, o.row_ptr, o.col_idx, o.values, 40).double(), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["weight", "channel"])
def test_format_round_trip_and_linear(mode: str) -> None:
    w, h = weight_and_hessian(32, 96)
    spec = QuantSpec(method="outlier", bits=4, group_size=32, sym=False, min_zero=1, format="outlier")
    options = OutlierOptions(mode=mode, fraction=0.03 if mode == "weight" else 0.05)
    qw, _ = run(spec, options, w, h)
    tensors = OutlierFormat.encode(qw)
    assert tensors["outlier_values"].dtype == torch.float16
    qconfig = OutlierFormat.quantization_config(ConfigFacts(spec, [], record=MethodRecord(keys=(("outlier_mode", mode),))))
    assert qconfig["outlier_mode"] == mode
    assert qconfig["quant_method"] == "quantize_llm_outlier" and qconfig["bits"] == 4
    back = OutlierFormat.decode(tensors, qconfig)
    torch.testing.assert_close(back.dequantize(torch.float64), qw.dequantize(torch.float64), rtol=0, atol=0)
    linear = OutlierLinear.from_quantized(back, torch.randn(32), torch.float32)
    x = torch.randn(5, 96, generator=GEN(2))
    expected = x.double() @ qw.dequantize(torch.float64).t() + linear.bias.double()
    torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_refuses_a_broken_csr() -> None:
    w, _ = weight_and_hessian(32, 96)
    spec = QuantSpec(method="outlier", bits=4, group_size=32, sym=False, min_zero=1, format="outlier")
    qw, _ = run(spec, OutlierOptions(fraction=0.03), w, None)
    tensors = OutlierFormat.encode(qw)
    tensors["outlier_col_idx"] = tensors["outlier_col_idx"].clone()
    tensors["outlier_col_idx"][0] = 500
    with pytest.raises(ValueError, match="outside"):
        OutlierFormat.decode(tensors, {"bits": 4, "group_size": 32, "outlier_mode": "weight"})


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": -0.1}, "outside"), ({"fraction": 1.5}, "outside"), ({"threshold": -1.0}, "positive"),
    ({"fraction": 0.01, "threshold": 2.0}, "both"), ({"inner": "awq"}, "--inner"), ({"mode": "row"}, "--mode"),
])
def test_bad_options_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        OutlierOptions(**kwargs)


def test_outliers_validate_their_shapes() -> None:
    with pytest.raises(ValueError):
        Outliers("weight", torch.zeros(3, dtype=torch.float16), row_ptr=torch.zeros(5, dtype=torch.int32),
                 col_idx=torch.zeros(2, dtype=torch.int16))


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 1.0])
def test_top_fraction_is_a_stable_descending_sorts_first_k(fraction: float) -> None:
    """Against the definition, with many ties (values from a small set) and NaN-free floats."""
    g = GEN(7)
    score = torch.randint(0, 50, (37, 91), generator=g).float() / 7
    k = round(fraction * score.numel())
    expected = torch.zeros(score.numel(), dtype=torch.bool)
    expected[torch.argsort(score.flatten(), descending=True, stable=True)[:k]] = True
    assert torch.equal(top_fraction(score, fraction), expected.view_as(score))


@pytest.mark.parametrize("fraction", [0.002, 0.05, 0.5])
def test_weight_mask_in_row_slices_is_the_stable_sorts_first_k(fraction: float, monkeypatch) -> None:
    """Sensitivities formed a few rows at a time select exactly what sorting them all selects,
    ties included (weights from a small set of values)."""
    import quantize_llm.algorithms.outlier as outlier

    g = GEN(11)
    w = (torch.randint(-6, 7, (29, 48), generator=g).float() / 5)
    diag = torch.rand(48, generator=g) + 0.5
    score = (w ** 2) / diag
    k = round(fraction * w.numel())
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[torch.argsort(score.flatten(), descending=True, stable=True)[:k]] = True
    monkeypatch.setattr(outlier, "SCORE_ELEMENTS", 48 * 3)             # 3 rows a slice
    assert torch.equal(weight_mask(w, ("fraction", fraction), diag), expected.view_as(w))
    assert torch.equal(weight_mask(w, ("threshold", 1.2), diag), score > 1.44 * score.double().mean())
