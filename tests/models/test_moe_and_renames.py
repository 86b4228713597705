"""Models whose stored tensors are not named as the model in memory names them: multimodal models
that transformers renames on load, and MoE models whose per-expert matrices it fuses into 3-D
parameters. References: transformers' own loader (from_pretrained) for what the names mean, and a
float64 recomputation from the stored per-expert matrices for what each expert sees."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from quantize_llm import load_quantized
from quantize_llm.calibration.experts import observing
from quantize_llm.models.load import CheckpointReader, build_skeleton
from quantize_llm.models.weightmap import build as build_map
from quantize_llm.models.weightmap import piece_shape


def _coverage_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "coverage.py"
    spec = importlib.util.spec_from_file_location("quantize_llm_coverage_script_moe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cov = _coverage_script()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The coverage script's tiny model of an architecture (its shrinking rules, seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            arch = next(a for a in cov.architectures() if a.name == name)
            cov.build(arch, root / name)
            built[name] = root / name
        return built[name]
    return make


@pytest.mark.parametrize("name", ["Qwen3MoeForCausalLM", "MixtralForCausalLM", "Gemma3ForConditionalGeneration"])
def test_weight_map_rebuilds_what_transformers_loads(tiny, name):
    folder = tiny(name)
    reference = getattr(transformers, name).from_pretrained(folder, dtype=torch.float32).state_dict()
    with CheckpointReader(folder) as reader:
        weights = build_map(build_skeleton(folder, reader.config), reader.names())
        assert not weights.identity
        for memory in [*weights.to_disk, *weights.fused]:
            if memory in reference:
                assert torch.equal(weights.assemble(memory, reader.read).float(), reference[memory].float()), memory
        for target, fused in weights.fused.items():
            shape = piece_shape(weights, target, tuple(reference[target].shape))
            assert all(tuple(reader.shape(n)) == shape for n in fused.names())


def test_each_expert_sees_its_routed_tokens(tiny):
    """observe_forward computes the block exactly as transformers' own experts implementation, and
    hands each expert the tokens routed to it and their gated intermediate, as a float64
    recomputation from the stored per-expert gate/up matrices gives them."""
    folder = tiny("Qwen3MoeForCausalLM")
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stored = load_file(folder / "model.safetensors")
    block = model.model.layers[0]
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    def routing(module, args, kwargs):
        seen["routing"] = (args, kwargs)

    handles = [block.register_forward_pre_hook(grab, with_kwargs=True),
               block.mlp.experts.register_forward_pre_hook(routing, with_kwargs=True)]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 16)), use_cache=False)
    for h in handles:
        h.remove()
    args, kwargs = seen["call"]
    with torch.no_grad():
        expected = block(*args, **kwargs)
    (hidden, index, _), _ = seen["routing"]
    got: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad(), observing(block, lambda m, e, r, x, n: got.__setitem__((e, r), x.clone())):
        output = block(*args, **kwargs)
    assert torch.allclose(output[0] if isinstance(output, tuple) else output,
                          expected[0] if isinstance(expected, tuple) else expected, atol=1e-5)
    experts = block.mlp.experts.down_proj.shape[0]
    for e in range(experts):
        tokens = (index == e).any(-1)
        x = hidden[tokens].double()
        if not len(x):
            continue
        gate = stored[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"].double()
        up = stored[f"model.layers.0.mlp.experts.{e}.up_proj.weight"].double()
        mid = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        assert torch.allclose(got[(e, "in")].double(), x, atol=1e-6)
        assert torch.allclose(got[(e, "mid")].double(), mid, atol=1e-5)


@pytest.mark.parametrize("name", ["Qwen3MoeForCausalLM", "Gemma3ForConditionalGeneration"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_under_stored_names_and_loaded_back(tiny, name, method, tmp_path, capsys):
    """Every expert is quantized on its own and written under the checkpoint's own name; our loader
    gives the logits of transformers' model holding the dequantized weights."""
    from test_cli import cli

    folder = tiny(name)
    calib = tmp_path / "calib.txt"
    calib.write_text(cov.CALIBRATION_TEXT)
    args = [method, folder, "-o", tmp_path / "out", "--group-size", "32"]
    if method == "gptq":
        args += ["--dataset", calib, "--nsamples", "4", "--seqlen", "32"]
    assert cli(*args) == 0
    err = capsys.readouterr().err
    if name.startswith("Gemma3"):   # the plan says what stays dense and what calibration runs through
        assert "dense: 15 Linears outside the decoder blocks (under model.vision_tower)" in err
        assert ("text only: the language model's blocks see it (not run: model.vision_tower, "
                "model.multi_modal_projector)" in err) == (method == "gptq")
    written = load_file(tmp_path / "out" / "model.safetensors")
    with CheckpointReader(folder) as reader:
        stored = reader.names()
    quantized = [n.removesuffix(".weight") for n in stored if f"{n.removesuffix('.weight')}.qweight" in written]
    if name.startswith("Qwen3Moe"):
        assert "model.layers.0.mlp.experts.3.down_proj" in quantized and "model.layers.0.mlp.gate" not in quantized
    else:
        assert any(n.startswith("language_model.model.layers.") for n in quantized)
        assert not any("vision_tower" in n for n in quantized)
    ours = cov.logits_of(load_quantized(tmp_path / "out"))
    reference = cov.logits_of(cov.reference_model(folder, tmp_path / "out", tmp_path / "ref", name))
    assert cov.compare(ours, reference)["ok"]


def test_experts_streamed_in_chunks_give_the_same_checkpoint(tiny, tmp_path, monkeypatch):
    """With room for one expert's Hessian at a time, the experts are gathered over several passes;
    the checkpoint is byte for byte the one a single pass writes."""
    from test_cli import cli

    from quantize_llm.calibration import sequential

    folder = tiny("Qwen3MoeForCausalLM")
    calib = tmp_path / "calib.txt"
    calib.write_text(cov.CALIBRATION_TEXT)
    args = ["--group-size", "32", "--dataset", calib, "--nsamples", "4", "--seqlen", "32"]
    assert cli("gptq", folder, "-o", tmp_path / "one", *args) == 0
    passes = []
    original = sequential._expert_chunks
    monkeypatch.setattr(sequential, "_expert_chunks",
                        lambda stage, width, budget: passes.append(1) or original(stage, width, 1))
    assert cli("gptq", folder, "-o", tmp_path / "many", *args) == 0
    assert len(passes) == 4   # two roles in each of two blocks
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "many/model.safetensors").read_bytes()


def test_a_hybrid_model_with_infinity_in_its_config(tiny, tmp_path, capsys):
    """Falcon-H1 (attention and Mamba in each block) saves `time_step_limit` as [0.0, inf], which
    transformers writes as {"__float__": "Infinity"}; its tiny Mamba projection [292, 64] does not
    fit the GPTQ layout and stays dense, listed in the plan."""
    from test_cli import cli

    folder = tiny("FalconH1ForCausalLM")
    assert '"__float__": "Infinity"' in (folder / "config.json").read_text()
    assert cli("rtn", folder, "-o", tmp_path / "out", "--group-size", "32") == 0
    assert "dense: 2 block Linears the format cannot hold, such as model.layers.0.mamba.in_proj" in capsys.readouterr().err
    ours = cov.logits_of(load_quantized(tmp_path / "out"))
    reference = cov.logits_of(cov.reference_model(folder, tmp_path / "out", tmp_path / "ref", "FalconH1ForCausalLM"))
    assert cov.compare(ours, reference)["ok"]


def test_routers_are_listed_as_unquantized(tiny, tmp_path):
    """Qwen3-MoE's router is a module of its own holding an (experts, hidden) matrix, not a torch
    Linear; vLLM builds it as a Linear layer, so compressed-tensors' `ignore` must name it."""
    import json

    from test_cli import cli

    folder = tiny("Qwen3MoeForCausalLM")
    assert cli("rtn", folder, "-o", tmp_path / "out", "--group-size", "32", "--format", "compressed-tensors") == 0
    ignore = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


@pytest.mark.parametrize("name", ["RecurrentGemmaForCausalLM", "MllamaForCausalLM", "BertLMHeadModel",
                                  "GlmMoeDsaForCausalLM", "BambaForCausalLM", "ProphetNetForCausalLM"])
def test_blocks_called_in_unusual_ways_are_calibrated(tiny, tmp_path, name):
    """RecurrentGemma passes use_cache positionally; Mllama skips its cross-attention layers on text
    (their Linears, which no calibration text reaches, are rounded to nearest); BERT-style causal LMs
    keep their blocks in an encoder and take token ids at `bert`, not at the encoder; GLM-MoE-DSA's
    blocks hand their sparse-attention choice to the next block and Bamba's a second output, so
    the blocks are run for real while their inputs are recorded; ProphetNet's decoder ties its
    embeddings to a stored parameter of another name."""
    import json

    from test_cli import cli

    folder = tiny(name)
    calib = tmp_path / "calib.txt"
    calib.write_text(cov.CALIBRATION_TEXT)
    assert cli("gptq", folder, "-o", tmp_path / "out", "--group-size", "32", "--dataset", calib,
               "--nsamples", "4", "--seqlen", "32", "--log-json", tmp_path / "log.jsonl") == 0
    ours = cov.logits_of(load_quantized(tmp_path / "out"))
    reference = cov.logits_of(cov.reference_model(folder, tmp_path / "out", tmp_path / "ref", name))
    assert cov.compare(ours, reference)["ok"]
    layers = [layer for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "block" for layer in json.loads(line)["layers"]]
    unused = {layer["name"] for layer in layers if layer["metrics"].get("unused")}
    assert bool(unused) == (name in ("MllamaForCausalLM", "ProphetNetForCausalLM"))   # cross-attention
    assert all(".cross_attn" in n or "cross_attn_mlp" in n or ".mlp." in n for n in unused)


def test_blocks_that_do_not_run_alone_are_refused_for_calibrated_methods(tiny, tmp_path, capsys):
    """XLNet's layers pass a second stream between them: one line naming the cause and rtn."""
    from test_cli import cli

    folder = tiny("XLNetLMHeadModel")
    calib = tmp_path / "calib.txt"
    calib.write_text(cov.CALIBRATION_TEXT)
    code = cli("gptq", folder, "-o", tmp_path / "out", "--group-size", "32", "--dataset", calib, "--nsamples", "4",
               "--seqlen", "32")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: block ") and "use rtn (or nf4) for this model" in err
    assert not (tmp_path / "out").exists()
    assert cli("rtn", folder, "-o", tmp_path / "rtn", "--group-size", "32") == 0
