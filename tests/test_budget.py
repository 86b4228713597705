"""--target-bpw / --target-size (run/budget.py): measured, solved, written as overrides, within budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize_llm.calibration.data import CalibrationSpec
from quantize_llm.core.spec import QuantSpec
from quantize_llm.errors import SpecError
from quantize_llm.eval.inspection import allocation_lines, inspect_checkpoint
from quantize_llm.run.budget import Budget, cache_path
from quantize_llm.run.execute import quantize
from quantize_llm.run.job import Job
from quantize_llm.run.plan import plan_run


def test_rtn_budget_is_met_exactly_and_written_as_overrides(tiny_model, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "out"
    spec = QuantSpec(method="rtn", bits=4, group_size=32)
    plan = plan_run(Job("j", str(src), out, spec, budget=Budget(bpw=3.6)))
    choice = plan.allocation
    assert choice is not None and choice.bits <= choice.limit
    assert len({s for s in choice.settings}) > 1            # a real mix, not one setting
    summary = quantize(str(src), out, spec, device="cpu", budget=Budget(bpw=3.6))
    # the stored bits are the predicted ones, to the bit, and within the budget
    assert 8 * summary.quantized_bytes == choice.bits
    assert summary.bits_per_weight <= 3.6
    info = inspect_checkpoint(out)
    got = {m.name: (m.bits, m.group_size, m.sym) for m in info.modules}
    assert got == dict(zip(choice.modules, choice.settings, strict=True))
    assert allocation_lines(info)[0].startswith("bits per weight per kind")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig.get("dynamic")                              # the GPTQ format carries the overrides
    card = (out / "README.md").read_text()
    assert "## Allocation" in card and "code bits per kind" in card
    assert cache_path(out).is_file()


def test_gptq_budget_measures_sensitivity_once_and_reuses_it(tiny_model, tmp_path, calib_file):
    src = tiny_model("llama")
    out = tmp_path / "out"
    cal = CalibrationSpec(source=str(calib_file), nsamples=4, seqlen=32)
    spec = QuantSpec(method="gptq", bits=4, group_size=32)
    first = plan_run(Job("j", str(src), out, spec, calibration=cal, batch_size=2, budget=Budget(bpw=4.5)))
    stamp = cache_path(out).stat().st_mtime_ns
    second = plan_run(Job("j", str(src), out, spec, calibration=cal, batch_size=2, budget=Budget(bpw=3.0)))
    assert cache_path(out).stat().st_mtime_ns == stamp       # one measurement, two budgets
    assert first.allocation.predicted <= second.allocation.predicted
    assert second.allocation.bits <= second.allocation.limit
    for choice in (first.allocation, second.allocation):
        for label, bpw, predicted in choice.uniform:          # no uniform setting of no larger size does better
            if bpw <= choice.bpw:
                assert choice.predicted <= predicted + 1e-12, label


def test_budget_needs_a_format_with_per_module_settings(tiny_model, tmp_path):
    src = tiny_model("llama")
    spec = QuantSpec(method="rtn", bits=4, group_size=32, sym=False, format="awq")
    with pytest.raises(SpecError, match="per-module allocation"):
        plan_run(Job("j", str(src), tmp_path / "out", spec, budget=Budget(bpw=4.0)))


def test_budget_keys_in_a_recipe(tmp_path: Path):
    from quantize_llm.run.recipe import job_from_dict

    job = job_from_dict({"model": "m", "output": str(tmp_path / "o"), "method": "gptq", "target_bpw": 3.5})
    assert job.budget == Budget(bpw=3.5)
    job = job_from_dict({"model": "m", "output": str(tmp_path / "o"), "method": "rtn", "target_size": "90MB"})
    assert job.budget == Budget(size=90_000_000)
    with pytest.raises(SpecError, match="not supported with nf4"):
        job_from_dict({"model": "m", "output": str(tmp_path / "o"), "method": "nf4", "target_bpw": 4.0})
    with pytest.raises(SpecError, match="outside"):
        job_from_dict({"model": "m", "output": str(tmp_path / "o"), "method": "rtn", "target_bpw": 1.0})


def test_sensitivity_probe_replays_the_blocks_before_the_module(tiny_model):
    """The KL probe of a module in block i computes only blocks i onward, and gives the logits a
    full forward gives with the same change."""
    import torch

    from quantize_llm.eval.evaluate import load_for_eval
    from quantize_llm.run.budget import BlockShortcut

    model, _ = load_for_eval(str(tiny_model("llama")))
    layers = model.model.layers
    assert len(layers) >= 2
    paths = [f"model.layers.{i}.mlp.down_proj" for i in range(len(layers))]
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    shortcut = BlockShortcut(model, paths)
    with torch.no_grad():
        base = torch.log_softmax(shortcut.record(tokens).float(), dim=-1)
        shortcut.check(tokens, base)
        assert shortcut.enabled
        calls = []
        hook = layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
        last = layers[-1].mlp.down_proj
        original = last.weight.data.clone()
        last.weight.data.add_(0.05 * torch.randn_like(original))
        replayed = shortcut.logits(tokens, paths[-1])
        assert not calls                                   # block 0 was not computed
        full = model(tokens, use_cache=False).logits
        assert calls                                       # and is again once the replay is over
        hook.remove()
        last.weight.data.copy_(original)
    assert not torch.allclose(full, model(tokens, use_cache=False).logits)   # the change mattered
    torch.testing.assert_close(replayed, full, rtol=1e-5, atol=1e-5)


def test_sensitivity_probe_runs_whole_forwards_for_modules_outside_one_block_list(tiny_model):
    import torch

    from quantize_llm.eval.evaluate import load_for_eval
    from quantize_llm.run.budget import BlockShortcut

    model, _ = load_for_eval(str(tiny_model("llama")))
    shortcut = BlockShortcut(model, ["model.layers.1.mlp.down_proj", "lm_head"])
    assert not shortcut.enabled
    tokens = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(shortcut.logits(tokens, "model.layers.1.mlp.down_proj"),
                                   model(tokens, use_cache=False).logits)


def test_gptq_proxy_predicts_gptq_error_where_rounding_error_does_not():
    """On inputs with strongly correlated columns GPTQ's feedback removes most of the rounding
    error; the solve-free estimate tracks GPTQ's error, tr(D H D^T) of rounding to nearest does not."""
    import torch

    from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
    from quantize_llm.algorithms.solve import energy
    from quantize_llm.run.budget import _rtn, gptq_column_weights, gptq_error_estimate

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(4096, 16, generator=g)
    x = latent @ torch.randn(16, 128, generator=g) + 0.05 * torch.randn(4096, 128, generator=g)
    h = x.t() @ x
    w = torch.randn(64, 128, generator=g)
    cw = gptq_column_weights(h, GPTQOptions().damp)
    for bits in (3, 4):
        spec = QuantSpec(method="gptq", bits=bits, group_size=32, min_zero=1)
        qw, _ = gptq_quantize(w.clone(), h.clone(), spec, GPTQOptions(clip="minmax"))
        actual = energy(w - qw.dequantize(torch.float32), h)
        d = w - _rtn(w, spec)
        assert 0.5 < gptq_error_estimate(d, cw) / actual < 2.0
        assert energy(d, h) / actual > 10


def test_unknown_budget_proxy_is_refused():
    with pytest.raises(SpecError, match="proxy"):
        Budget(bpw=4.0, proxy="magic")


def test_gptq_proxy_is_measured_apart_from_the_rounding_proxy(tiny_model, tmp_path, calib_file):
    import torch

    src = tiny_model("llama")
    out = tmp_path / "out"
    cal = CalibrationSpec(source=str(calib_file), nsamples=4, seqlen=32)
    spec = QuantSpec(method="gptq", bits=4, group_size=32)
    plan_run(Job("j", str(src), out, spec, calibration=cal, batch_size=2, budget=Budget(bpw=4.5)))
    rtn = torch.load(cache_path(out), weights_only=True)
    chosen = plan_run(Job("j", str(src), out, spec, calibration=cal, batch_size=2,
                          budget=Budget(bpw=4.5, proxy="gptq"))).allocation
    gptq = torch.load(cache_path(out), weights_only=True)
    assert gptq["key"] != rtn["key"]                     # not read from the other proxy's cache
    assert gptq["sensitivity"] == rtn["sensitivity"]     # the same measured effect on the output
    assert gptq["error"] != rtn["error"]                 # a different estimate of each module's error
    assert chosen.bits <= chosen.limit


def test_parts_vllm_merges_share_one_setting_at_the_optimum():
    """q/k/v and gate/up of a block get one setting (vLLM runs each as one module), and among such
    allocations the solver's is the cheapest: checked against every tied assignment."""
    import itertools
    import random

    from quantize_llm.run.budget import Measurement, allocate, tied_groups

    names = [f"model.layers.{b}.{m}" for b in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "self_attn.o_proj",
                                                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    rng = random.Random(0)
    settings = [(2, 128, True), (4, 128, True), (8, 128, True)]
    params = [rng.choice([64, 128, 256]) * 64 for _ in names]
    sizes = [[p * bits + p // 8 for bits, _, _ in settings] for p in params]
    error = [[rng.uniform(0.5, 2.0) * 4.0 ** -bits for bits, _, _ in settings] for _ in names]
    m = Measurement("k", names, settings, error, [rng.uniform(0.2, 3.0) for _ in names], [])
    groups = tied_groups(names)
    assert [len(g) for g in groups] == [3, 1, 2, 1] * 2
    choice = allocate(m, Budget(bpw=4.1), sizes, params)
    for group in groups:
        assert len({choice.settings[i] for i in group}) == 1
    limit = int(4.1 * sum(params))
    best = min(sum(m.sensitivity[i] * error[i][k] for g, k in zip(groups, pick, strict=True) for i in g)
               for pick in itertools.product(range(3), repeat=len(groups))
               if sum(sizes[i][k] for g, k in zip(groups, pick, strict=True) for i in g) <= limit)
    assert choice.predicted == pytest.approx(best, rel=1e-9)


def test_strict_vllm_candidates_are_what_vllm_serves_everywhere():
    from quantize_llm.formats.gptq import GPTQFormat
    from quantize_llm.formats.vllm import setting_reason
    from quantize_llm.run.budget import candidates

    spec = QuantSpec(method="gptq", bits=4, group_size=128)
    strict = candidates(spec, GPTQFormat, strict_vllm=True)
    loose = candidates(spec, GPTQFormat, strict_vllm=False)
    assert strict and set(strict) < set(loose)
    assert all(setting_reason(spec.replace(bits=b, group_size=g, sym=s), "gptq") is None for b, g, s in strict)
    assert (8, 128, True) in loose and (8, 128, True) not in strict   # vLLM's CPU backend serves 4-bit only


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_budget_in_compressed_tensors_is_config_groups(tiny_model, tmp_path, dtype):
    """Its stored bits are the predicted ones: scales are kept in the model's dtype (float32 for a
    bfloat16 model, whose float16 scales bfloat16 cannot hold)."""
    import torch

    src = tiny_model("llama", dtype=getattr(torch, dtype))
    out = tmp_path / "out"
    spec = QuantSpec(method="rtn", bits=4, group_size=32, format="compressed-tensors")
    choice = plan_run(Job("j", str(src), out, spec, budget=Budget(bpw=5.5))).allocation
    assert choice is not None and len(set(choice.settings)) > 1
    assert {s[0] for s in choice.settings} <= {2, 4, 8}                     # the widths the format holds
    summary = quantize(str(src), out, spec, device="cpu", budget=Budget(bpw=5.5))
    assert 8 * summary.quantized_bytes == choice.bits and summary.bits_per_weight <= 5.5
    got = {m.name: (m.bits, m.group_size, m.sym) for m in inspect_checkpoint(out).modules}
    assert got == dict(zip(choice.modules, choice.settings, strict=True))
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == len(set(choice.settings))
