"""GPTQ through the whole pipeline, against a reference that runs the plain transformers model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import cli

from quantize_llm.algorithms.gptq import GPTQOptions, gptq_quantize
from quantize_llm.calibration.data import CalibrationSpec, read_documents, select_samples
from quantize_llm.core.spec import QuantSpec
from quantize_llm.formats.gptq import GPTQFormat
from quantize_llm.models.architectures import ARCHITECTURES
from quantize_llm.models.load import CheckpointReader
from quantize_llm.run.execute import quantize


def reference_gptq(src: Path, tokens: torch.Tensor, spec: QuantSpec, options: GPTQOptions,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Quantize with the whole transformers model: each stage observes its Linears' inputs through a
    full forward pass of the model (earlier Linears already fake-quantized). Returns dequantized weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    arch = ARCHITECTURES[model.config.architectures[0]]
    layers = model.get_submodule(arch.layers)
    out = {}
    for i, layer in enumerate(layers):
        stages = [[g] for g in arch.sequential] if options.true_sequential else [list(arch.sequential)]
        for stage in stages:
            hess = {}

            def hook(key):
                def fn(module, args):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    hess[key] = hess.get(key, 0) + x.t() @ x
                return fn

            handles = [layer.get_submodule(g[0]).register_forward_pre_hook(hook(g[0])) for g in stage]
            with torch.no_grad():
                for batch in tokens.split(batch_size):
                    model(batch, use_cache=False)
            for h in handles:
                h.remove()
            for group in stage:
                for name in group:
                    linear = layer.get_submodule(name)
                    qw, _ = gptq_quantize(linear.weight.data, hess[group[0]], spec, options)
                    linear.weight.data = qw.dequantize()
                    out[f"{arch.layers}.{i}.{name}"] = qw.dequantize()
    return out


def decoded(out: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(out) as reader:
        qconfig = reader.config["quantization_config"]
        names = [n[:-len(".qweight")] for n in reader.names() if n.endswith(".qweight")]
        return {p: GPTQFormat.decode({t: reader.read(f"{p}.{t}") for t in GPTQFormat.tensor_names}, qconfig).dequantize()
                for p in names}


@pytest.mark.parametrize("arch,true_sequential,act_order", [("llama", True, False), ("qwen2", False, True),
                                                           ("gemma2", True, True), ("opt", True, False),
                                                           ("phi3", True, False)])
def test_pipeline_matches_whole_model_reference(tiny_model, tmp_path, calib_file, arch, true_sequential, act_order):
    from transformers import AutoTokenizer

    src = tiny_model(arch)
    spec = QuantSpec(method="gptq", bits=4, group_size=32, sym=False, act_order=act_order)
    options = GPTQOptions(block_size=16, true_sequential=true_sequential)
    summary = quantize(str(src), tmp_path / "out", spec, options=options, device="cpu", batch_size=4,
                       calibration=CalibrationSpec(source=str(calib_file), nsamples=6, seqlen=48))
    tokens, _ = select_samples(read_documents(str(calib_file)), AutoTokenizer.from_pretrained(src), 6, 48)
    want = reference_gptq(src, tokens, spec.replace(min_zero=1), options, batch_size=4)
    got = decoded(tmp_path / "out")
    assert set(got) == set(want)
    for name in want:
        same = torch.isclose(got[name], want[name], rtol=0, atol=1e-6).float().mean()
        assert same > 0.995, (name, float(same))
    assert summary.calibration["nsamples"] == 6 and len(summary.calibration["sha256"]) == 64
    assert all(0 < r.metrics["rel_error"] < 0.5 for r in summary.layers)


def test_act_order_checkpoint_loads_to_fake_quant_logits(tiny_model, tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    from quantize_llm import load_quantized

    src = tiny_model("llama")
    out = tmp_path / "out"
    assert cli("gptq", src, "-o", out, "--group-size", 32, "--act-order", "--asym", "--dataset", calib_file,
               "--nsamples", 4, "--seqlen", 32) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["desc_act"] is True and qconfig["damp_percent"] == 0.01
    assert qconfig["meta"]["calibration"]["path"] == str(calib_file.resolve())
    weights = decoded(out)
    with CheckpointReader(out) as reader:
        g_idx = reader.read("model.layers.0.mlp.down_proj.g_idx")
    assert torch.bincount(g_idx.long()).tolist() == [32] * 4 and not torch.equal(g_idx, torch.arange(128) // 32)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, w in weights.items():
        model.get_submodule(name).weight.data = w
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(out, dtype=torch.float32)(ids).logits, model(ids).logits,
                                   rtol=0, atol=2e-5)


def test_gptq_beats_rtn_on_the_calibration_text(tiny_model, tmp_path, calib_file):
    from transformers import AutoTokenizer

    from quantize_llm.eval.evaluate import evaluate, load_for_eval

    src = tiny_model("llama")
    for name, args in (("rtn", ["rtn"]), ("gptq", ["gptq", "--dataset", calib_file, "--nsamples", 8, "--seqlen", 64])):
        assert cli(*args, src, "-o", tmp_path / name, "--bits", 3, "--group-size", 32) == 0
    tokens, _ = select_samples(read_documents(str(calib_file)), AutoTokenizer.from_pretrained(src), 8, 64)
    base, _ = load_for_eval(str(src))
    kl = {name: evaluate(load_for_eval(str(tmp_path / name))[0], tokens, base).kl for name in ("rtn", "gptq")}
    assert kl["gptq"] < kl["rtn"]


def test_same_seed_gives_byte_identical_files(tiny_model, tmp_path, calib_file):
    src = tiny_model("qwen3")
    for name in ("a", "b"):
        assert cli("gptq", src, "-o", tmp_path / name, "--dataset", calib_file, "--nsamples", 4, "--seqlen", 32,
                   "--group-size", 32) == 0
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_self_calibration_says_so(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    assert cli("gptq", src, "-o", tmp_path / "out", "--nsamples", 2, "--seqlen", 16, "--group-size", 32) == 0
    assert "calibrating on text the model generates itself" in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["calibration"]["source"].startswith("self-generated")
    assert "SHA-256" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "missing.txt"], "missing.txt"),
    (["--static-groups"], "--act-order"),
    (["--damp", "0"], "--damp"),
    (["--nsamples", "500", "--seqlen", "512"], "lower --nsamples"),
])
def test_gptq_bad_input(tiny_model, tmp_path, calib_file, capsys, args, needle):
    from test_cli import expect_error

    args = [a if a != "missing.txt" else str(tmp_path / "missing.txt") for a in args]
    if "--dataset" not in args:
        args += ["--dataset", str(calib_file)]
    expect_error(capsys, ["gptq", tiny_model("llama"), "-o", tmp_path / "out", *args], needle)
    assert not (tmp_path / "out").exists()


def test_eval_warns_when_evaluating_on_the_calibration_file(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    assert cli("gptq", src, "-o", tmp_path / "out", "--dataset", calib_file, "--nsamples", 2, "--seqlen", 32,
               "--group-size", 32) == 0
    capsys.readouterr()
    assert cli("eval", tmp_path / "out", "--dataset", calib_file, "--seqlen", 64, "--windows", 2) == 0
    assert "calibrated on" in capsys.readouterr().err
