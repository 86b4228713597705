"""GPTQ onto llama.cpp's block grids, against independent references: llama.cpp's reference
quantizer where no error is fed back, the gguf package's dequantizer for the bytes, a float64
column-by-column GPTQ on the same grids, and the output error's definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantize_llm.algorithms.base import LayerContext
from quantize_llm.algorithms.ggml_gptq import GgmlGPTQ, ggml_gptq
from quantize_llm.algorithms.gptq import GPTQOptions
from quantize_llm.core import ggml
from quantize_llm.core.spec import QuantSpec

K_QUANTS = ["Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def problem(rows: int = 12, cols: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs of uneven scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0.0                                                     # a block of zeros
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(2048, cols, generator=g) * torch.linspace(0.3, 3.0, cols)) @ mix
    return w, x.t() @ x


def out_error(w: torch.Tensor, q: np.ndarray, h: torch.Tensor) -> float:
    d = w.double() - torch.from_numpy(q).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_without_feedback_the_k_quants_are_llama_cpps_reference_bytes(type_name):
    w, _ = problem()
    got, _ = ggml_gptq(w, 10.0 * torch.eye(512), type_name, weighted=False, search=False)   # H = cI: no feedback
    assert np.array_equal(got.pack(), ggml.quantize_rtn(type_name, w.numpy()).pack())


@pytest.mark.parametrize("type_name", LEGACY)
def test_without_feedback_the_legacy_types_take_the_nearest_point_of_the_stored_grid(type_name):
    """Their reference rounds with the scale before it is stored in float16; here the grid is the
    stored one, so every weight is at least as close to its value as the reference puts it."""
    w, _ = problem()
    ref = ggml.quantize_rtn(type_name, w.numpy())
    got, _ = ggml_gptq(w, 10.0 * torch.eye(512), type_name, weighted=False, search=False)
    assert all(np.array_equal(got.params[k], ref.params[k]) for k in ref.params)
    x = w.numpy()
    assert (np.abs(x - ggml.dequantize(got)) <= np.abs(x - ggml.dequantize(ref)) + 1e-7).all()


@pytest.mark.parametrize("type_name", [*K_QUANTS, "Q4_0", "Q8_0"])
def test_the_bytes_mean_to_the_gguf_package_what_the_solve_fed_back(type_name):
    import gguf

    w, h = problem()
    got, _ = ggml_gptq(w, h, type_name)
    theirs = gguf.quants.dequantize(got.pack(), gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(theirs.reshape(got.shape), ggml.dequantize(got))


def reference_gptq(w: torch.Tensor, h: torch.Tensor, type_name: str, damp: float = 0.01) -> np.ndarray:
    """Float64 GPTQ one column at a time with the explicit inverse (the OBS update), each block's
    fields chosen by llama.cpp's reference quantizer from its current columns; the codes."""
    t = ggml.TYPES[type_name]
    w = w.double().clone()
    h = h.double()
    hd = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    rows, n = w.shape
    codes = np.zeros((rows, n), dtype=np.int16)
    s = m = None
    for j in range(n):
        if j % t.block == 0:
            block = ggml.quantize_rtn(type_name, w[:, j:j + t.block].float().numpy())
            s, m = ggml.affine(type_name, block.params)
        k = (j % t.block) // t.sub
        sj, mj = torch.from_numpy(s[:, k]).double(), torch.from_numpy(m[:, k]).double()
        # a sub-block whose scale is 0 stands for m whatever its code: the reference's code is kept
        kept = torch.from_numpy(block.codes[:, j % t.block]).double()
        code = torch.where(sj == 0, kept, torch.round((w[:, j] - mj) / sj.masked_fill(sj == 0, 1)).clamp(t.lo, t.hi))
        codes[:, j] = code.numpy()
        err = (w[:, j] - (sj * code + mj)) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("type_name", ["Q4_K", "Q3_K", "Q6_K", "Q4_0"])
def test_codes_match_a_float64_column_by_column_gptq(type_name):
    w, h = problem(rows=8, cols=256, seed=1)
    got, _ = ggml_gptq(w, h, type_name, GPTQOptions(block_size=64), weighted=False, search=False)
    ref = reference_gptq(w, h, type_name)
    agree = float((got.codes == ref).mean())
    assert agree > 0.995, agree    # float32 against float64: a rare code lands the other side of a tie


@pytest.mark.parametrize("type_name", ["Q4_K", "Q3_K", "Q6_K", "Q4_0"])
@pytest.mark.parametrize("act_order", [False, True])
def test_feedback_lowers_the_output_error_and_reports_its_definition(type_name, act_order):
    w, h = problem(seed=2)
    rtn = out_error(w, ggml.dequantize(ggml.quantize_rtn(type_name, w.numpy())), h)
    algo = GgmlGPTQ(QuantSpec(method="gptq", bits=4, group_size=128, act_order=act_order),
                    types={"model.layers.0.fc": type_name})
    algo.hessians["fc"] = h.clone()
    reports: dict = {}
    result = algo.quantize_layer(LayerContext(index=0, weights={"fc": w}, prefix="model.layers.0.",
                                              report=lambda n, m: reports.update(m)))["fc"]
    assert "fc" not in algo.hessians                                    # factored where it lay
    q = ggml.dequantize(result.weight)
    assert out_error(w, q, h) < 0.8 * rtn
    defined = (out_error(w, q, h) / float(((w.double() @ h.double()) * w.double()).sum())) ** 0.5
    assert reports["rel_error"] == pytest.approx(defined, rel=1e-3)
    assert reports["ggml_type"] == type_name
    if act_order:   # every block's fields are chosen for the original weights, diag(H) weighing them
        ref = ggml.quantize_rtn(type_name, w.numpy(), h.diagonal().numpy())
        assert all(np.array_equal(result.weight.params[k], ref.params[k]) for k in ref.params)
    assert torch.equal(result.dequantize(), torch.from_numpy(q))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0"])
def test_the_feedback_search_never_loses_on_a_lone_block(type_name):
    """The scale chosen by its cost with the errors fed back inside the block: on a single block
    (nothing before it, so the cost it minimizes is the row's whole loss) no row does worse than
    with the searched scale alone."""
    w, h = problem(rows=64, cols=512, seed=7)
    w32, h32 = w[:, :32].contiguous(), h[:32, :32].contiguous()
    _, plain = ggml_gptq(w32, h32, type_name, search=False)
    got, searched = ggml_gptq(w32, h32, type_name, GPTQOptions(clip="feedback"))   # --clip feedback
    assert bool((searched.row_error <= plain.row_error * (1 + 1e-5)).all())
    assert float(searched.row_error.sum()) < float(plain.row_error.sum())
    assert not np.array_equal(got.params["d"], ggml_gptq(w32, h32, type_name, search=False)[0].params["d"])


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K"])
def test_the_feedback_search_lowers_a_layers_output_error(type_name):
    """Block scales (legacy types) and sub-block scales and mins (k-quants) chosen by their cost
    with the errors fed back: the layer's output error drops (4-7% legacy, 12-17% k-quants here)."""
    w, h = problem(rows=64, cols=512, seed=7)
    whole = [out_error(w, ggml.dequantize(ggml_gptq(w, h, type_name, search=s)[0]), h) for s in (False, True)]
    assert whole[1] < 0.97 * whole[0], whole


def test_a_row_that_does_not_fill_the_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml_gptq(torch.zeros(2, 320), torch.eye(320), "Q4_K")


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_an_importance_weighted_field_search_lowers_the_weighted_error(type_name):
    """Fields searched under llama.cpp's importance weights: the rounding error weighted by the
    importance is lower than with the reference's fields (summed over many blocks)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 512, generator=g) * 0.05).numpy()
    importance = (torch.rand(512, generator=g) ** 4 * 100 + 0.01).numpy()

    def weighted_error(qw):
        return float((importance * (x - ggml.dequantize(qw)) ** 2).sum())

    plain = weighted_error(ggml.quantize_rtn(type_name, x))
    searched = weighted_error(ggml.quantize_rtn(type_name, x, importance))
    assert searched < 0.95 * plain, (searched, plain)


def test_types_without_a_weighted_search_ignore_the_importance():
    x = (torch.randn(4, 256, generator=torch.Generator().manual_seed(6)) * 0.05).numpy()
    for type_name in ("Q8_0", "Q4_1", "Q5_1", "Q3_K"):
        assert np.array_equal(ggml.quantize_rtn(type_name, x, np.ones(256, dtype=np.float32)).pack(),
                              ggml.quantize_rtn(type_name, x).pack())


@pytest.mark.parametrize("type_name", ["Q4_K", "Q3_K"])
def test_qep_fits_the_float_outputs_on_the_block_grids(type_name):
    """--qep onto llama.cpp's grids: fed the quantized model's inputs beside the float model's, the
    solve reproduces the float outputs better than plain GPTQ on the same grid, and it solves
    exactly the corrected target (solve.input_error_target) plain GPTQ would be given."""
    from quantize_llm.algorithms.solve import accumulate_cross, accumulate_hessian, input_error_target

    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 256, generator=g) * 0.05
    x_float = torch.randn(2048, 256, generator=g) * torch.linspace(0.3, 3.0, 256)
    x = x_float + x_float @ (torch.randn(256, 256, generator=g) * 0.004) + 0.05 * torch.randn(2048, 256, generator=g)
    types = {"model.layers.0.fc": type_name}
    spec = QuantSpec(method="gptq", bits=4, group_size=128)
    outputs = {}
    for qep in (0.0, 1.0):
        algo = GgmlGPTQ(spec, GPTQOptions(qep=qep), types=types)
        assert algo.float_inputs == (qep > 0) and (("qep", 1.0) in algo.record().keys) == (qep > 0)
        for rows in (slice(0, 1024), slice(1024, 2048)):
            algo.observe_pair("fc", x[rows], x_float[rows]) if qep else algo.observe("fc", x[rows])
        result = algo.quantize_layer(LayerContext(index=0, weights={"fc": w}, prefix="model.layers.0."))["fc"]
        assert not algo.crosses
        outputs[qep] = torch.from_numpy(ggml.dequantize(result.weight))
    errors = {qep: float((x @ q.t() - x_float @ w.t()).norm()) for qep, q in outputs.items()}
    assert errors[1.0] < {"Q4_K": 0.9, "Q3_K": 0.97}[type_name] * errors[0.0], errors   # 3-bit rounding's own counts more
    hessians: dict = {}
    crosses: dict = {}
    for rows in (slice(0, 1024), slice(1024, 2048)):
        accumulate_hessian(hessians, "fc", x[rows])
        accumulate_cross(crosses, "fc", x[rows], x_float[rows])
    options = GPTQOptions()
    target = input_error_target(w, hessians["fc"], crosses["fc"], 1.0, options.damp, options.damp_max)
    plain = GgmlGPTQ(spec, options, types=types)
    plain.hessians["fc"] = hessians["fc"]
    expected = plain.quantize_layer(LayerContext(index=0, weights={"fc": target}, prefix="model.layers.0."))["fc"]
    assert torch.equal(torch.from_numpy(ggml.dequantize(expected.weight)), outputs[1.0])
