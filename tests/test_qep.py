"""`gptq --qep`: each Linear fitted to the float model's outputs from the quantized model's inputs.

The target correction is checked against a float64 least-squares solve, the pipeline against a
reference that runs two whole transformers models (one float, one fake-quantized stage by stage),
and the run's resume state, plan and command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from reference import make_layer
from test_cli import cli
from test_gptq_pipeline import decoded
from test_resume import events, fail_after, same_files

from quantize_llm.algorithms.base import LayerContext
from quantize_llm.algorithms.gptq import GPTQ, GPTQOptions, gptq_quantize
from quantize_llm.algorithms.solve import input_error_target
from quantize_llm.calibration.data import CalibrationSpec, read_documents, select_samples
from quantize_llm.core.spec import QuantSpec
from quantize_llm.models.architectures import ARCHITECTURES
from quantize_llm.run.execute import quantize


def perturbed(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The inputs a quantized model might give: x plus an error correlated with x."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(x.shape[1], x.shape[1], generator=g, dtype=x.dtype) * 0.05 / x.shape[1] ** 0.5
    return x + x @ mix + 0.02 * torch.randn(x.shape, generator=g, dtype=x.dtype)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_target_is_the_least_squares_fit_of_the_float_outputs(alpha):
    w, x_float = make_layer(24, 40, tokens=400)
    x = perturbed(x_float)
    h, cross = x.T @ x, (x_float - x).T @ x
    got = input_error_target(w, h, cross, alpha, damp=1e-9, damp_max=1.0)
    # independent: argmin ||X W'^T - X_f W^T|| by QR in float64, blended with W by alpha
    full = torch.linalg.lstsq(x.double(), x_float.double() @ w.double().T).solution.T
    want = w.double() + alpha * (full - w.double())
    assert torch.allclose(got.double(), want, atol=2e-4 * float(want.abs().max()))
    assert not torch.allclose(want, w.double(), atol=1e-3)   # the inputs' error moved the target
    # inputs without error: the target is the weight itself
    assert torch.allclose(input_error_target(w, h, torch.zeros_like(h), 1.0, 1e-9, 1.0), w, atol=1e-6)


def test_the_float_weight_and_hessian_are_left_as_they_were():
    w, x_float = make_layer(8, 16, tokens=64)
    x = perturbed(x_float)
    h, cross = x.T @ x, (x_float - x).T @ x
    w0, h0 = w.clone(), h.clone()
    input_error_target(w, h, cross, 1.0, 0.01, 1.0)
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_qep_lowers_the_error_against_the_float_outputs():
    """On inputs with error, GPTQ fitted to the float outputs reproduces them better than plain
    GPTQ (which fits the quantized model's own outputs) at 4 and 3 bits."""
    w, x_float = make_layer(64, 128, tokens=1024)
    x = perturbed(x_float)
    for bits in (4, 3):
        spec = QuantSpec(method="gptq", bits=bits, group_size=32, sym=False)
        errors = {}
        for qep in (0.0, 1.0):
            algo = GPTQ(spec, GPTQOptions(qep=qep))
            assert algo.float_inputs == (qep > 0)
            for chunk in range(4):
                rows = slice(256 * chunk, 256 * (chunk + 1))
                if qep:
                    algo.observe_pair("lin", x[rows], x_float[rows])
                else:
                    algo.observe("lin", x[rows])
            qw = algo.quantize_layer(LayerContext(index=0, weights={"lin": w.clone()}))["lin"]
            errors[qep] = float((x @ qw.dequantize(torch.float32).T - x_float @ w.T).norm())
        # the inputs' error counts less beside 3-bit rounding's own
        assert errors[1.0] < {4: 0.9, 3: 0.97}[bits] * errors[0.0], (bits, errors)


def test_qep_range_is_checked():
    with pytest.raises(Exception, match=r"--qep 1.5 must be in \[0, 1\]"):
        GPTQOptions(qep=1.5)


def reference_qep(src: Path, tokens: torch.Tensor, spec: QuantSpec, options: GPTQOptions,
                  batch_size: int, got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTQ with the float outputs as its target, on whole transformers models: a float model, and a
    copy whose Linears are replaced by their quantized values stage by stage. Each stage's
    Hessian X^T X comes from the copy's inputs, C = (X_f - X)^T X from both models' (float64), the
    target W + alpha W C H^-1 (H damped as the solve damps it) is solved in float64.

    The copy takes the pipeline's quantized values (`got`) once a stage is compared, so that each
    stage is checked on the inputs the pipeline saw: C is a difference of nearly equal activations,
    and one code rounded the other way upstream moves it far more than it moves X^T X."""
    from transformers import AutoModelForCausalLM

    floating = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    arch = ARCHITECTURES[model.config.architectures[0]]
    out = {}
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        float_layer = floating.get_submodule(arch.layers)[i]
        stages = [[g] for g in arch.sequential] if options.true_sequential else [list(arch.sequential)]
        for stage in stages:
            seen: dict[tuple[str, str], list[torch.Tensor]] = {}

            def hook(key, seen=seen):
                def fn(module, args):
                    seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
                return fn

            handles = [m.get_submodule(g[0]).register_forward_pre_hook(hook((which, g[0])))
                       for which, m in (("q", layer), ("f", float_layer)) for g in stage]
            with torch.no_grad():
                for batch in tokens.split(batch_size):
                    model(batch, use_cache=False)
                    floating(batch, use_cache=False)
            for h in handles:
                h.remove()
            for group in stage:
                x, x_float = torch.cat(seen[("q", group[0])]), torch.cat(seen[("f", group[0])])
                h, cross = x.T @ x, (x_float - x).T @ x
                damped = h.clone()
                diag = torch.diagonal(damped)
                diag[diag == 0] = 1.0
                diag += options.damp * float(diag.mean())
                for name in group:
                    linear = layer.get_submodule(name)
                    w = linear.weight.data.double()
                    target = w + options.qep * torch.linalg.solve(damped, (w @ cross).T).T
                    qw, _ = gptq_quantize(target.float(), h.float(), spec, options)
                    out[f"{arch.layers}.{i}.{name}"] = qw.dequantize()
                    linear.weight.data = got[f"{arch.layers}.{i}.{name}"].clone()
    return out


@pytest.mark.parametrize("arch,true_sequential", [("llama", True), ("qwen2", False)])
def test_pipeline_matches_two_model_reference(tiny_model, tmp_path, calib_file, arch, true_sequential):
    from transformers import AutoTokenizer

    src = tiny_model(arch)
    spec = QuantSpec(method="gptq", bits=3, group_size=32, sym=False)
    options = GPTQOptions(block_size=16, true_sequential=true_sequential, qep=1.0)
    summary = quantize(str(src), tmp_path / "out", spec, options=options, device="cpu", batch_size=4,
                       calibration=CalibrationSpec(source=str(calib_file), nsamples=6, seqlen=48))
    tokens, _ = select_samples(read_documents(str(calib_file)), AutoTokenizer.from_pretrained(src), 6, 48)
    got = decoded(tmp_path / "out")
    want = reference_qep(src, tokens, spec.replace(min_zero=1), options, 4, got)
    assert set(got) == set(want)
    for name in want:
        same = torch.isclose(got[name], want[name], rtol=0, atol=1e-6).float().mean()
        assert same > 0.98, (name, float(same))
    # and it is not plain GPTQ: the float model's inputs moved the codes
    plain = quantize(str(src), tmp_path / "plain", spec, options=GPTQOptions(block_size=16,
                     true_sequential=true_sequential), device="cpu", batch_size=4,
                     calibration=CalibrationSpec(source=str(calib_file), nsamples=6, seqlen=48))
    assert plain is not None
    other = decoded(tmp_path / "plain")
    later = [n for n in want if ".layers.1." in n]   # by then the quantized model's inputs have drifted
    assert all(not torch.equal(other[n], got[n]) for n in later)
    assert summary.calibration["nsamples"] == 6


@pytest.fixture
def deep_model(tmp_path: Path) -> Path:
    return build_tiny("llama", tmp_path / "deep", config={"num_hidden_layers": 6})


def test_resume_after_a_crash_is_byte_identical(deep_model, tmp_path, calib_file, monkeypatch):
    args = ["gptq", deep_model, "--group-size", 32, "--qep", 1, "--dataset", calib_file, "--nsamples", 8,
            "--seqlen", 32, "--batch-size", 4]
    assert cli(*args, "-o", tmp_path / "whole") == 0
    fail_after(monkeypatch, 3)
    assert cli(*args, "-o", tmp_path / "out") == 1
    monkeypatch.undo()
    saved = tmp_path / ".out.resume" / "inputs-00003.safetensors"
    from safetensors import safe_open
    with safe_open(str(saved), "pt") as f:   # both models' activations: 2 batches each
        keys = sorted(f.keys(), key=int)
        assert keys == ["0", "1", "2", "3"]
        assert not torch.equal(f.get_tensor("0"), f.get_tensor("2"))   # quantized against float
    log = tmp_path / "log.jsonl"
    assert cli(*args, "-o", tmp_path / "out", "--log-json", log) == 0
    assert [e for e in events(log) if e["event"] == "resume"][0]["from_block"] == 3
    same_files(tmp_path / "whole", tmp_path / "out")


def test_cli_records_qep_and_the_plan_says_so(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    args = ["gptq", src, "--group-size", 32, "--dataset", calib_file, "--nsamples", 8, "--seqlen", 32]
    assert cli(*args, "--qep", "0.5", "-o", tmp_path / "out") == 0
    printed = capsys.readouterr()
    assert "the float model's kept beside the quantized model's (--qep)" in printed.out + printed.err
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["qep"] == 0.5 and config["meta"]["options"]["qep"] == 0.5
    assert cli(*args, "--qep", "2", "-o", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "--qep 2 must be in [0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    # GGUF too: the same correction onto llama.cpp's block grids (a file unlike the plain run's)
    assert cli(*args, "--qep", "1", "--format", "gguf", "-o", tmp_path / "qep.gguf") == 0
    assert cli(*args, "--format", "gguf", "-o", tmp_path / "plain.gguf") == 0
    assert (tmp_path / "qep.gguf").read_bytes() != (tmp_path / "plain.gguf").read_bytes()


def test_the_plan_counts_both_streams(tiny_model, calib_file, monkeypatch):
    from test_plan_phases import plan_of

    import quantize_llm.run.plan as plan_module

    src = tiny_model("llama", config={"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "num_hidden_layers": 2}, dtype=torch.bfloat16)
    cal = CalibrationSpec(source=str(calib_file), nsamples=2, seqlen=16)
    plain = plan_of(src, "gptq", cal, options=GPTQOptions())
    paired = plan_of(src, "gptq", cal, options=GPTQOptions(qep=1.0))
    assert paired.activation_bytes == 2 * plain.activation_bytes
    assert paired.paired and not plain.paired
    # the float weights kept, (X_f - X)^T X and the target's factor: a block and two Hessians more
    assert paired.host_phases["blocks"] - plain.host_phases["blocks"] >= plain.block_bytes + 2 * plain.hessian_bytes
    assert any("(--qep)" in line for line in paired.lines())
    # short of memory, a plain run holds its block narrow; a --qep run cannot (its float weights stay)
    monkeypatch.setattr(plan_module, "memory_room", lambda dev: plain.host_peak_bytes - 1)
    assert plan_of(src, "gptq", cal, options=GPTQOptions()).narrow
    assert not plan_of(src, "gptq", cal, options=GPTQOptions(qep=1.0)).narrow
