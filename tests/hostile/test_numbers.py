"""Numbers out of range: finite checkpoint values whose quantization needs a scale, absmax, outlier
value or bias beyond float16 (where the formats store them), and calibration inputs that overflow
float32. Each is refused with exit 2, naming the module, what overflowed and the fix; none is
mistaken for a damping problem."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny
from hostile_harness import assert_untouched, half_written, refused, run_cli, tree
from safetensors.torch import load_file, save_file

CAL = ["--dataset", "{home}/calib.txt", "--nsamples", "4", "--seqlen", "32"]
Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"
NORM = "model.layers.0.input_layernorm"


@pytest.fixture(scope="session")
def _biased_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("hostile-bias") / "llama", config=dict(attention_bias=True))


def damage(model: Path, tensor: str, index: tuple, value: float) -> None:
    """Set one entry (or a slice) of a checkpoint tensor to a finite but huge value."""
    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors[tensor][index] = value
    save_file(tensors, path, metadata={"format": "pt"})


def named(module: str) -> tuple[str, str]:
    """Needles: the module named first, and the --keep-dense fix for exactly it."""
    return rf"^error: {re.escape(module)}: ", re.escape(f"--keep-dense '{re.escape(module)}$'")


OVERFLOWS = [
    # (id, command, damaged tensor, index, value, needles)
    ("rtn-weight-3e38", ["rtn", "--group-size", "32"], f"{Q}.weight", (3, 5), 3e38,
     (*named(Q), r"scale 4e\+37 \(from a weight of 3e\+38\) exceeds float16's 65504")),
    ("rtn-weight-1e6", ["rtn", "--group-size", "32"], f"{DOWN}.weight", (3, 5), 1e6,
     (*named(DOWN), r"scale 1\.33e\+05 \(from a weight of 1e\+06\) exceeds float16's 65504")),
    ("gptq-weight-3e38", ["gptq", "--group-size", "32", *CAL], f"{Q}.weight", (3, 5), 3e38,
     (*named(Q), r"scale 4e\+37 \(from a weight of 3e\+38\) exceeds float16's 65504")),
    ("gptq-weight-1e6", ["gptq", "--group-size", "32", *CAL], f"{DOWN}.weight", (3, 5), 1e6,
     (*named(DOWN), r"scale \S+ \(from a weight of 1e\+06\) exceeds float16's 65504")),
    # a whole row: every input channel has a huge weight, so no AWQ scaling brings it into range
    ("awq-row-1e6", ["awq", "--group-size", "32", *CAL], f"{Q}.weight", (0,), 1e6,
     (*named(Q), r"scale \S+ \(from a weight of \S+\) exceeds float16's 65504")),
    ("nf4-weight-3e38", ["nf4"], f"{Q}.weight", (3, 5), 3e38,
     (*named(Q), r"absmax 3e\+38 exceeds float16's 65504")),
    ("nf4-weight-1e5", ["nf4", "--no-double-quant"], f"{DOWN}.weight", (3, 5), 1e5,
     (*named(DOWN), r"absmax 1e\+05 exceeds float16's 65504")),
    ("nf4-gptq-weight-3e38", ["nf4", "--rounding", "gptq", *CAL], f"{Q}.weight", (3, 5), 3e38,
     (*named(Q), r"absmax 3e\+38 exceeds float16's 65504")),
    ("outlier-weight-3e38", ["outlier", "--group-size", "32"], f"{Q}.weight", (3, 5), 3e38,
     (*named(Q), r"outlier value 3e\+38 exceeds float16's 65504")),
    ("outlier-gptq-weight-1e6", ["outlier", "--inner", "gptq", "--group-size", "32", *CAL], f"{DOWN}.weight",
     (3, 5), 1e6, (*named(DOWN), r"outlier value 1e\+06 exceeds float16's 65504")),
    ("outlier-channel-weight-3e38", ["outlier", "--mode", "channel", "--group-size", "32", *CAL], f"{Q}.weight",
     (3, 5), 3e38, (*named(Q), r"scale \S+ \(from a weight of 3e\+38\) exceeds float16's 65504")),
]


@pytest.mark.parametrize("args,tensor,index,value,needles", [c[1:] for c in OVERFLOWS], ids=[c[0] for c in OVERFLOWS])
def test_values_beyond_float16_are_refused(world, capsys, args, tensor, index, value, needles):
    damage(world / "model", tensor, index, value)
    result = refused(capsys, world, [args[0], world / "model", "-o", world / "out",
                                     *(a.format(home=world) for a in args[1:])], needles=needles)
    assert "damp" not in result.error


@pytest.mark.parametrize("args", [["rtn", "--group-size", "32"], ["gptq", "--group-size", "32", *CAL],
                                  ["outlier", "--group-size", "32"]], ids=["rtn", "gptq", "outlier"])
def test_a_bias_beyond_float16_is_refused(world, capsys, _biased_llama, args):
    """gptq-layout formats store biases in float16: 1e6 would be written as inf."""
    shutil.rmtree(world / "model")
    shutil.copytree(_biased_llama, world / "model")
    damage(world / "model", f"{Q}.bias", (3,), 1e6)
    refused(capsys, world, [args[0], world / "model", "-o", world / "out", *(a.format(home=world) for a in args[1:])],
            needles=(*named(Q), r"bias 1e\+06 exceeds float16's 65504"))


def test_a_bias_beyond_float16_is_kept_where_the_format_stores_float32(world, capsys, _biased_llama):
    """bnb keeps biases in the checkpoint's dtype: nothing to refuse."""
    shutil.rmtree(world / "model")
    shutil.copytree(_biased_llama, world / "model")
    damage(world / "model", f"{Q}.bias", (3,), 1e6)
    before = tree(world)
    result = run_cli(capsys, "nf4", world / "model", "-o", world / "out")
    assert result.code == 0, result.err
    assert_untouched(before, world, new=["out"])
    assert half_written(world) == []
    assert float(load_file(world / "out" / "model.safetensors")[f"{Q}.bias"][3]) == 1e6


def test_convert_refuses_a_bias_the_target_cannot_store(world, capsys, _biased_llama):
    """compressed-tensors keeps the float32 bias; converting to gptq would cast it to float16."""
    shutil.rmtree(world / "model")
    shutil.copytree(_biased_llama, world / "model")
    damage(world / "model", f"{Q}.bias", (3,), 1e6)
    ct = world / "ct"
    assert run_cli(capsys, "rtn", world / "model", "-o", ct, "--group-size", 32,
                   "--format", "compressed-tensors").code == 0
    refused(capsys, world, ["convert", ct, "-o", world / "out", "--format", "gptq"],
            needles=(*named(Q), r"bias 1e\+06 exceeds float16's 65504"))


INPUT_OVERFLOWS = [
    # a norm weight of 3e38 (norms stay dense): the q/k/v inputs overflow float32
    ("gptq", ["gptq", "--group-size", "32", *CAL],
     (rf"^error: {re.escape(Q)}, \S+k_proj, \S+v_proj: its calibration inputs overflow float32",)),
    ("nf4-gptq", ["nf4", "--rounding", "gptq", *CAL], (rf"^error: {re.escape(Q)}: its calibration inputs overflow",)),
    ("outlier-gptq", ["outlier", "--inner", "gptq", "--group-size", "32", *CAL],
     (rf"^error: {re.escape(Q)}: its calibration inputs overflow",)),
    ("outlier-calibrated-score", ["outlier", "--group-size", "32", *CAL],
     (rf"^error: {re.escape(Q)}: its calibration inputs overflow",)),
    ("awq", ["awq", "--group-size", "32", *CAL], (r"^error: block 0: its output on the calibration inputs overflows",)),
]


@pytest.mark.parametrize("args,needles", [c[1:] for c in INPUT_OVERFLOWS], ids=[c[0] for c in INPUT_OVERFLOWS])
def test_calibration_inputs_overflowing_float32_are_refused(world, capsys, args, needles):
    damage(world / "model", f"{NORM}.weight", (0,), 3e38)
    result = refused(capsys, world, [args[0], world / "model", "-o", world / "out",
                                     *(a.format(home=world) for a in args[1:])],
                     needles=(*needles, "damaged"))
    assert "damp" not in result.error


def test_a_quantized_output_head_beyond_float16_is_refused(world, capsys):
    """The head is rounded on its own (a recipe override): its overflow names it too."""
    damage(world / "model", "lm_head.weight", (3, 5), 3e38)
    recipe = world / "recipe.toml"
    recipe.write_text(f"""
[[jobs]]
model = "{world / 'model'}"
output = "{world / 'out'}"
method = "rtn"
bits = 4
group_size = 32
overrides = [{{match = '^lm_head$', bits = 8, group_size = 64}}]
""")
    refused(capsys, world, ["run", recipe], needles=(r"^error: job 0 \(out\): lm_head: scale \S+ \(from a weight of 3e\+38\)",
                                                    named("lm_head")[1]))


def test_the_suggested_keep_dense_is_the_fix(world, capsys):
    """Rerunning with the --keep-dense the error suggests quantizes the rest and keeps the damaged
    Linear as it was."""
    damage(world / "model", f"{DOWN}.weight", (3, 5), 1e6)
    result = refused(capsys, world, ["rtn", world / "model", "-o", world / "out", "--group-size", 32])
    pattern = re.search(r"--keep-dense '([^']+)'", result.error).group(1)
    assert run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32,
                   "--keep-dense", pattern).code == 0
    written = load_file(world / "out" / "model.safetensors")
    assert float(written[f"{DOWN}.weight"][3, 5]) == 1e6
    assert "model.layers.1.mlp.down_proj.qweight" in written and f"{DOWN}.qweight" not in written


def test_self_calibration_on_nan_weights_is_refused(world, capsys):
    """Self-generated calibration loads the model through transformers before any block is read."""
    from hostile_harness import refused
    from safetensors.torch import load_file, save_file

    path = world / "model" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    refused(capsys, world, ["gptq", world / "model", "-o", world / "out", "--nsamples", 2, "--seqlen", 8],
            needles=("not finite", "damaged"))
