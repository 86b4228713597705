"""AWQ's pieces against independent references: folding keeps every family's function, the scale
formula, the search's choices, and the clip search against a brute-force float64 loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ARCHS, TINY_CONFIGS
from torch import nn

from quantize_llm.algorithms import awq
from quantize_llm.algorithms.awq import AWQ, AWQOptions, _Capture, awq_scales, fold, fold_problem, hessian_clip_params
from quantize_llm.algorithms.solve import accumulate_hessian, energy
from quantize_llm.core.spec import QuantSpec
from quantize_llm.errors import SpecError
from quantize_llm.models.architectures import ARCHITECTURES, AWQScale


def tiny_model(arch: str, mha: bool, seed: int = 0) -> nn.Module:
    """A float64 tiny model of `arch` with random weights, norms included (so folds are visible)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = TINY_CONFIGS[arch]
    kwargs = dict(kwargs)
    if mha and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def fold_all(model: nn.Module, arch_map, seed: int = 1) -> int:
    """Fold random positive scales for every applicable AWQ group of every block; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    folded = 0
    for block in model.get_submodule(arch_map.layers):
        for entry in arch_map.awq:
            if fold_problem(block, entry) is not None:
                continue
            width = block.get_submodule(entry.layers[0]).in_features
            s = torch.empty(width, dtype=torch.float64).uniform_(0.3, 3.0, generator=gen)
            with torch.no_grad():
                fold(block, entry, s, set())
            folded += 1
    return folded


@pytest.mark.parametrize("mha", [True, False], ids=["mha", "gqa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_folding_keeps_the_function(arch: str, mha: bool) -> None:
    model = tiny_model(arch, mha)
    arch_map = ARCHITECTURES[type(model).__name__]
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        n = fold_all(model, arch_map)
        after = model(input_ids=ids).logits
    blocks = len(model.get_submodule(arch_map.layers))
    # every group folds, except v -> o under grouped-query attention
    assert n == blocks * (len(arch_map.awq) - (0 if mha or arch == "opt" else 1))
    # float64 models; Gemma norms compute in float32 whatever the dtype, hence 1e-5
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_norm_folds_through_one_plus_weight(arch: str) -> None:
    """Gemma's RMSNorm multiplies by (1 + weight): folding as if it multiplied by weight breaks it."""
    model = tiny_model(arch, mha=True)
    arch_map = ARCHITECTURES[type(model).__name__]
    assert all(e.norm_offset == 1.0 for e in arch_map.awq if "norm" in e.prev)
    wrong = dataclasses.replace(arch_map, awq=tuple(dataclasses.replace(e, norm_offset=0.0) for e in arch_map.awq))
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        fold_all(model, wrong)
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3


def test_gemma2_mlp_scale_goes_into_the_pre_feedforward_norm() -> None:
    arch_map = ARCHITECTURES["Gemma2ForCausalLM"]
    mlp = next(e for e in arch_map.awq if e.inspect == "mlp")
    assert mlp.prev == "pre_feedforward_layernorm"


def test_grouped_query_attention_skips_v_to_o() -> None:
    model = tiny_model("llama", mha=False)
    block = model.model.layers[0]
    entry = next(e for e in ARCHITECTURES["LlamaForCausalLM"].awq if e.prev == "self_attn.v_proj")
    assert "grouped-query" in fold_problem(block, entry)


def test_scales_formula() -> None:
    act = torch.tensor([0.5, 1.0, 4.0, 2.0])
    for alpha in (0.0, 0.35, 0.95):
        s = act.double() ** alpha
        expected = s / (s.max() * s.min()).sqrt()
        torch.testing.assert_close(awq_scales(act, alpha).double(), expected, rtol=1e-6, atol=0)
    flat = torch.full((64,), 0.37)
    for alpha in (0.0, 0.5, 0.95):
        assert torch.equal(awq_scales(flat, alpha), torch.ones(64))


class _Block(nn.Module):
    """A norm feeding one Linear: the smallest thing a scaling group applies to."""

    def __init__(self, in_features: int = 64, out_features: int = 48, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(in_features), requires_grad=False)
        self.fc = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)


ENTRY = AWQScale("norm", ("fc",), "fc")


def search(block: _Block, x: torch.Tensor, spec: QuantSpec, copies: int = 1, duo: bool = False) -> tuple:
    """The scales and metrics of one group's search; copies > 1 spreads the trial alphas over
    block copies on CPU workers, as a run over several devices does."""
    import copy

    stats = _Capture(block, [ENTRY], n_search=1)
    for fn in stats.hooks().values():
        fn(0, (x,), {})
    blocks = [block] + [copy.deepcopy(block) for _ in range(copies - 1)]
    s, metrics = AWQ(spec, AWQOptions(duo_scaling=duo))._search(blocks, (torch.device("cpu"),) * copies, ENTRY,
                                                                 stats, ("fc",))
    return s, metrics


@pytest.mark.parametrize("duo", [False, True])
def test_a_search_spread_over_copies_gives_the_same_scales(duo) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 20
    spec = QuantSpec(bits=3, group_size=32, sym=False)
    block = _Block()
    weight = block.fc.weight.data.clone()
    one = search(block, x, spec, duo=duo)
    for copies in (2, 3):
        s, metrics = search(block, x, spec, copies, duo=duo)
        assert torch.equal(s, one[0]) and metrics == one[1]
    assert torch.equal(block.fc.weight.data, weight)                        # the trials are undone


def test_flat_activations_choose_alpha_zero() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(512, 64, generator=g) < 0.5, -1.0, 1.0)     # |x| = 1 on every channel
    _, metrics = search(_Block(), x, QuantSpec(bits=3, group_size=32, sym=False))
    assert metrics["alpha"] == 0.0
    assert metrics["search_error_after"] == metrics["search_error_before"]


def test_outlier_channels_choose_positive_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 20                                                         # a few salient input channels
    _, metrics = search(_Block(), x, QuantSpec(bits=3, group_size=32, sym=False))
    assert metrics["alpha"] > 0
    assert metrics["search_error_after"] < 0.9 * metrics["search_error_before"]


def brute_force_clip(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float):
    """Per row and group, every ratio in float64, straight from the definition."""
    out_features, in_features = w.shape
    gs = spec.effective_group_size(in_features)
    ratios = [1 - i / grid for i in range(int(max_shrink * grid) + 1)]
    chosen = torch.zeros(out_features, spec.n_groups(in_features), dtype=torch.float64)
    for r in range(out_features):
        for g in range(spec.n_groups(in_features)):
            cols = slice(g * gs, min(in_features, (g + 1) * gs))
            wg = w[r, cols].double()
            hg = h[cols, cols].double()
            best, best_p = None, None
            for p in ratios:
                lo, hi = min(float(wg.min()), 0.0) * p, max(float(wg.max()), 0.0) * p
                scale = torch.tensor((hi - lo) / spec.maxq).to(torch.float16).double()
                zero = min(max(round(-lo / float(scale)), spec.min_zero), spec.maxq)
                q = torch.clamp(torch.round(wg / scale) + zero, 0, spec.maxq)
                d = scale * (q - zero) - wg
                err = float(d @ hg @ d)
                if best is None or err < best - 1e-12 * abs(best):
                    best, best_p = err, p
            chosen[r, g] = best_p
    return chosen


def test_clip_search_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 80, generator=g) * 0.05
    w[0, 3] = 0.6                                                          # an outlier worth clipping around
    x = torch.randn(300, 80, generator=g) * torch.linspace(0.1, 3, 80)
    h = x.t() @ x
    spec = QuantSpec(bits=3, group_size=32, sym=False)                     # 80 = 32 + 32 + a partial 16
    scale, zero, ratio = hessian_clip_params(w, h, spec, grid=20, max_shrink=0.5)
    expected = brute_force_clip(w, h, spec, 20, 0.5)
    torch.testing.assert_close(ratio.double(), expected, rtol=0, atol=1e-6)
    assert (ratio < 1).any()


def test_clip_search_keeps_full_range_for_unseen_inputs() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    _, _, ratio = hessian_clip_params(w, torch.zeros(32, 32), QuantSpec(bits=4, group_size=16, sym=False))
    assert torch.equal(ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": 0}, "--grid"), ({"max_shrink": 1.0}, "--max-shrink"), ({"then": "hqq"}, "--then"),
    ({"search_samples": -1}, "--search-samples"), ({"damp": 0}, "--damp"),
])
def test_bad_options_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        AWQOptions(**kwargs)


def test_duo_scales_formula() -> None:
    from quantize_llm.algorithms.awq import duo_scales, weight_mean

    w = torch.tensor([[1.0, -2.0, 4.0, 0.5], [2.0, 2.0, -1.0, 1.0]])
    w_mean = weight_mean([w], group_size=2)
    expected_w = torch.tensor([[0.5, 1.0, 1.0, 0.125], [1.0, 1.0, 1.0, 1.0]]).mean(0)
    torch.testing.assert_close(w_mean, expected_w, rtol=1e-5, atol=1e-5)
    act = torch.tensor([0.5, 1.0, 4.0, 2.0])
    s = act.double() ** 0.3 / (expected_w.double() ** 0.7 + 1e-4)
    torch.testing.assert_close(duo_scales(act, w_mean, 0.3).double(), s / (s.max() * s.min()).sqrt(),
                               rtol=1e-5, atol=0)


def test_a_lone_linear_seeing_fewer_tokens_than_its_width_is_measured_on_its_inputs() -> None:
    """With fewer tokens than input channels the search keeps the inputs X (smaller than X^T X, and
    the cheaper product); the scales and errors are those of the Hessian's objective."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 64, generator=g)
    x[:, :4] *= 20
    spec = QuantSpec(bits=3, group_size=32, sym=False)
    block = _Block()
    stats = _Capture(block, [ENTRY], n_search=1)
    for fn in stats.hooks().values():
        fn(0, (x,), {})
    assert "norm" in stats.flat and "norm" not in stats.hessians
    s_inputs, m_inputs = AWQ(spec)._search([block], (torch.device("cpu"),), ENTRY, stats, ("fc",))
    stats.flat.pop("norm")
    stats.hessians["norm"] = x.t() @ x                                     # the Hessian's objective
    s_hessian, m_hessian = AWQ(spec)._search([block], (torch.device("cpu"),), ENTRY, stats, ("fc",))
    assert m_inputs["alpha"] == m_hessian["alpha"] > 0 and torch.equal(s_inputs, s_hessian)
    for key in ("search_error_before", "search_error_after"):
        assert m_inputs[key] == pytest.approx(m_hessian[key], rel=1e-5)


def test_the_inputs_give_way_to_their_hessian_once_they_outgrow_it() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(40, 64, generator=g) for _ in range(3)]
    stats = _Capture(_Block(), [ENTRY], n_search=1)
    hook = next(iter(stats.hooks().values()))
    hook(0, (batches[0],), {})
    assert [x.shape[0] for x in stats.flat["norm"]] == [40]
    for i, x in enumerate(batches[1:], start=1):
        hook(i, (x,), {})
    expected: dict = {}
    for x in batches:                                  # as if the Hessian had been gathered from the first
        accumulate_hessian(expected, "norm", x)
    assert "norm" not in stats.flat and torch.equal(stats.hessians["norm"], expected["norm"])


def test_input_energy_against_float64() -> None:
    g = torch.Generator().manual_seed(4)
    d = torch.randn(300, 96, generator=g)
    xs = [torch.randn(n, 96, generator=g) for n in (17, 50)]
    reference = float(sum(((x.double() @ d.double().t()) ** 2).sum() for x in xs))
    got = awq.input_energy((300, lambda a, b: d[a:b]), xs)
    assert got == pytest.approx(reference, rel=1e-5)
    assert energy((300, lambda a, b: d[a:b]), sum(x.t() @ x for x in xs)) == pytest.approx(reference, rel=1e-4)
