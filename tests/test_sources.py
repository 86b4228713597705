"""Sources beyond a plain float checkpoint: FP8 checkpoints read as bfloat16, other quantized sources
refused, models with code of their own (--trust-remote-code), and a multimodal model's processor files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import cli, expect_error

from quantize_llm.formats.checkpoint import carried_name
from quantize_llm.models.load import HUB_PATTERNS, CheckpointReader, build_skeleton, check_against_config

FP8_MAX = 448.0


def expand(scale: torch.Tensor, out: int, inp: int, block: tuple[int, int] | None) -> torch.Tensor:
    """The factor of every weight, float64 (out, inp), by indexing (independent of the reader's code)."""
    s = scale.double()
    if block is not None:
        rows, cols = torch.arange(out) // block[0], torch.arange(inp) // block[1]
        return s[rows][:, cols]
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out, inp)
    return s.reshape(out, 1).expand(out, inp)                      # per output channel


def make_fp8(src: Path, dst: Path, *, kind: str = "block", block: tuple[int, int] | None = (128, 128),
             style: str = "fp8") -> dict[str, torch.Tensor]:
    """Copy checkpoint `src` to `dst` with every block Linear's weight in float8_e4m3fn plus its factor
    (`style` fp8: DeepSeek-V3's weight_scale_inv; compressed-tensors: weight_scale); returns the
    reference bfloat16 weights: the float64 product of the stored values and their factors, rounded once."""
    tensors = load_file(src / "model.safetensors")
    reference = {}
    for name in list(tensors):
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        w = tensors[name].double()
        out, inp = w.shape
        if kind == "block":
            grid = torch.zeros(math.ceil(out / block[0]), math.ceil(inp / block[1]), dtype=torch.float64)
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                    grid[i, j] = part.abs().max() / FP8_MAX
            scale = grid.float()
        elif kind == "channel":
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).float()
        else:
            scale = (w.abs().max() / FP8_MAX).float().reshape(1)
        factor = expand(scale, out, inp, block if kind == "block" else None)
        stored = (w / factor).to(torch.float8_e4m3fn)
        tensors[name] = stored
        tensors[name + ("_scale_inv" if style == "fp8" else "_scale")] = scale
        if style == "compressed-tensors":
            tensors[name[: -len(".weight")] + ".input_scale"] = torch.ones(1)     # a static activation scale
        reference[name] = (stored.double() * factor).to(torch.bfloat16)
    dst.mkdir()
    for path in src.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            (dst / path.name).write_bytes(path.read_bytes())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if style == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": list(block) if kind == "block" else None}
    else:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": kind}
        if kind == "block":
            weights["block_structure"] = list(block)
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                                "dynamic": False}}},
            "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    return reference


def dequantized_copy(fp8: Path, dst: Path, reference: dict[str, torch.Tensor]) -> Path:
    """The bfloat16 checkpoint the FP8 one stands for: the reference weights, the scales gone."""
    tensors = {n: t for n, t in load_file(fp8 / "model.safetensors").items()
               if not n.endswith(("_scale_inv", "_scale", ".input_scale"))}
    tensors.update(reference)
    dst.mkdir()
    for path in fp8.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            (dst / path.name).write_bytes(path.read_bytes())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


CASES = [("fp8", "block", (128, 128)), ("fp8", "block", (48, 40)), ("compressed-tensors", "block", (32, 64)),
         ("compressed-tensors", "channel", None), ("compressed-tensors", "tensor", None)]


@pytest.mark.parametrize("style,kind,block", CASES)
def test_the_reader_dequantizes_fp8_weights_to_the_reference(tiny_model, tmp_path, style, kind, block):
    src = tiny_model("llama", dtype=torch.bfloat16)
    reference = make_fp8(src, tmp_path / "fp8", kind=kind, block=block, style=style)
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    with CheckpointReader(tmp_path / "fp8") as reader:
        assert "quantization_config" not in reader.config
        assert reader.source_quantization["quant_method"] == style
        names = reader.names()
        assert not [n for n in names if n.endswith(("_scale_inv", "_scale", "input_scale"))]
        assert set(names) == {n for n in stored if not n.endswith(("_scale_inv", "_scale", "input_scale"))}
        for name, want in reference.items():
            assert reader.dtype(name) == torch.bfloat16 and reader.nbytes(name) == want.numel() * 2
            got = reader.read(name, check_finite=True)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
        assert torch.equal(reader.read("model.embed_tokens.weight"), stored["model.embed_tokens.weight"])
        assert reader.total_bytes == sum(reader.nbytes(n) for n in names)
        check_against_config(reader, build_skeleton(reader.folder, reader.config))


def test_rtn_of_an_fp8_source_is_the_rtn_of_its_bfloat16_model(tiny_model, tmp_path, calib_file):
    src = tiny_model("llama", dtype=torch.bfloat16)
    reference = make_fp8(src, tmp_path / "fp8", block=(128, 128))
    plain = dequantized_copy(tmp_path / "fp8", tmp_path / "bf16", reference)
    for model, out in ((tmp_path / "fp8", tmp_path / "out-fp8"), (plain, tmp_path / "out-bf16")):
        assert cli("rtn", model, "-o", out, "--bits", 4, "--group-size", 32) == 0
    got = load_file(tmp_path / "out-fp8" / "model.safetensors")
    want = load_file(tmp_path / "out-bf16" / "model.safetensors")
    assert set(got) == set(want) and not [n for n in got if "scale_inv" in n]
    for name in want:
        assert torch.equal(got[name], want[name]), name
    config = json.loads((tmp_path / "out-fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    # eval of the original reads it through the same bfloat16 view
    from quantize_llm.eval.evaluate import run_eval

    ppl = [run_eval(str(m), calib_file, seqlen=32, windows=2).perplexity for m in (tmp_path / "fp8", plain)]
    assert math.isfinite(ppl[0]) and ppl[0] == ppl[1]


def test_a_damaged_fp8_source_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    make_fp8(src, tmp_path / "fp8", block=(128, 128))
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    tensors[name] = torch.ones(3, 3)
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    expect_error(capsys, ["rtn", tmp_path / "fp8", "-o", tmp_path / "out"], f"{name} has shape \\[3, 3\\]")
    del tensors[name]
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    expect_error(capsys, ["rtn", tmp_path / "fp8", "-o", tmp_path / "out"],
                 "model.layers.0.mlp.down_proj.weight is float8 but has no scale")


@pytest.mark.parametrize("qconfig,convert", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}, True),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, True),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, True),
    ({"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}, False),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                                      "strategy": "group", "group_size": 128}}}}, True),
    ({"quant_method": "hqq"}, False)])
def test_other_quantized_sources_are_refused_naming_the_method(tiny_model, tmp_path, capsys, qconfig, convert):
    src = tiny_model("llama")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig
    (src / "config.json").write_text(json.dumps(config))
    err = expect_error(capsys, ["rtn", src, "-o", tmp_path / "out"],
                       f"already quantized \\({qconfig['quant_method']}\\).*start from the unquantized checkpoint")
    assert ("quantize-llm convert" in err) == convert
    assert not (tmp_path / "out").exists()


# ---- --trust-remote-code --------------------------------------------------------------------------------

CONFIGURATION = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
'''
MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


@pytest.fixture
def custom_model(tiny_model, tmp_path, monkeypatch) -> Path:
    """A tiny Llama whose config.json names code of its own (auto_map, a model_type transformers lacks);
    the architecture name stays one our map knows."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    src = tiny_model("llama")
    (src / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (src / "modeling_tiny_custom.py").write_text(MODELING)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="tiny_custom", auto_map={
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM"})
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_custom_code_is_refused_without_the_flag(custom_model, tmp_path, capsys):
    err = expect_error(capsys, ["rtn", custom_model, "-o", tmp_path / "out"], "--trust-remote-code")
    assert "modeling_tiny_custom.TinyCustomForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_custom_code_runs_with_the_flag(custom_model, tmp_path, capsys):
    assert type(build_skeleton(custom_model, trust_remote_code=True)).__name__ == "TinyCustomForCausalLM"
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli("rtn", custom_model, "-o", out, "--bits", 4, "--group-size", 32, "--trust-remote-code") == 0
    err = capsys.readouterr().err
    assert sum("--trust-remote-code: Python code from" in line for line in err.splitlines()) == 1
    assert (out / "modeling_tiny_custom.py").read_text() == MODELING            # the auto_map still resolves
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    from quantize_llm.runtime.load import load_quantized

    assert type(load_quantized(out, trust_remote_code=True)).__name__ == "TinyCustomForCausalLM"


def test_a_builtin_model_type_with_an_auto_map_needs_no_flag(tiny_model, tmp_path):
    """Like transformers: an auto_map beside a model_type it has built in is ignored without the flag."""
    src = tiny_model("llama")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    assert type(build_skeleton(src)).__name__ == "LlamaForCausalLM"
    assert cli("rtn", src, "-o", tmp_path / "out", "--bits", 4, "--group-size", 32) == 0


def test_recipes_type_check_trust_remote_code(tmp_path):
    from quantize_llm.errors import UsageError
    from quantize_llm.run.recipe import job_from_dict

    keys = {"model": str(tmp_path), "output": str(tmp_path / "out"), "method": "rtn"}
    assert job_from_dict({**keys, "trust_remote_code": True}).trust_remote_code is True
    assert job_from_dict(keys).trust_remote_code is False
    with pytest.raises(UsageError, match="trust_remote_code"):
        job_from_dict({**keys, "trust_remote_code": "yes"})


# ---- processor files ------------------------------------------------------------------------------------

PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.jinja", "chat_template.json"]


def test_processor_files_and_extra_chat_templates_are_carried(tiny_model, tmp_path):
    src = tiny_model("llama")
    for i, name in enumerate(PROCESSOR_FILES):
        (src / name).write_text(json.dumps({"file": i}))
    extra = src / "additional_chat_templates"
    (extra / "nested").mkdir(parents=True)
    (extra / "tool_use.jinja").write_text("{{ tools }}")
    (extra / "rag.jinja").write_text("{{ documents }}")
    (extra / ".hidden").write_text("no")
    (extra / "nested" / "deep.jinja").write_text("no")
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--bits", 4, "--group-size", 32) == 0
    for name in PROCESSOR_FILES:
        assert (out / name).read_text() == (src / name).read_text(), name
    assert sorted(p.name for p in (out / "additional_chat_templates").iterdir()) == ["rag.jinja", "tool_use.jinja"]
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    conv = tmp_path / "conv"
    assert cli("convert", out, "-o", conv, "--format", "compressed-tensors") == 0
    assert (conv / "additional_chat_templates" / "rag.jinja").read_text() == "{{ documents }}"
    assert (conv / "preprocessor_config.json").exists()


def test_extra_file_names_cannot_leave_the_folder():
    assert carried_name("tokenizer.json") and carried_name("additional_chat_templates/tool_use.jinja")
    for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "/abs", "/additional_chat_templates/x", "additional_chat_templates/../x",
                "additional_chat_templates/", "additional_chat_templates/.hidden", "additional_chat_templates/a/b",
                "additional_chat_templates/..", "x\\y", "additional_chat_templates/x\\..\\y"]:
        assert not carried_name(bad), bad


def test_hub_downloads_include_the_processor_files():
    for pattern in ["preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                    "chat_template*", "additional_chat_templates/*"]:
        assert pattern in HUB_PATTERNS
    assert not any(p.endswith(".py") for p in HUB_PATTERNS)


def test_gptq_with_self_written_calibration_and_generate_read_an_fp8_source(tiny_model, tmp_path):
    """The float model that writes calibration text, and generate's, come from the bfloat16 view."""
    from quantize_llm.eval.generate import generate

    src = tiny_model("llama", dtype=torch.bfloat16)
    make_fp8(src, tmp_path / "fp8", block=(48, 40))
    assert cli("gptq", tmp_path / "fp8", "-o", tmp_path / "out", "--bits", 4, "--group-size", 32,
               "--nsamples", 2, "--seqlen", 16, "--batch-size", 2) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert generate(str(tmp_path / "fp8"), "Hello", max_new_tokens=3, device="cpu", ignore_eos=True).new_tokens == 3
