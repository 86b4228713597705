"""A block held narrow: where a float32 block does not fit beside its Hessians, the plan holds the
quantized Linears as stored (bf16), widens each one for its call, observes one input group per
pass and serves solved Linears from their codes. The checkpoint written is the same, byte for
byte; the plan says so and predicts less; the choice is made only where it is needed."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from test_cli import cli
from test_plan_phases import plan_of

import quantize_llm.algorithms.awq as awq
import quantize_llm.calibration.sequential as sequential
import quantize_llm.run.plan as plan_module
from quantize_llm.calibration.data import CalibrationSpec


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


real_input_energy = awq.input_energy

METHODS = {
    "gptq": ["gptq", "--group-size", 32],
    "gptq-act-order-all-at-once": ["gptq", "--group-size", 32, "--act-order", "--no-true-sequential"],
    "outlier-gptq": ["outlier", "--group-size", 32, "--inner", "gptq", "--outlier-fraction", 0.01],
    "nf4-gptq": ["nf4", "--rounding", "gptq"],
    # AWQ: its folds into Linears held narrow are replayed when they are widened (v_proj's rows for
    # o_proj under full multi-head attention, up_proj's rows for down_proj, every group's columns)
    "awq": ["awq", "--group-size", 32],
    "awq-then-gptq": ["awq", "--group-size", 32, "--then", "gptq"],
    "awq-few-tokens": ["awq", "--group-size", 32],   # down_proj's search on its inputs (64 tokens < 128 wide)
}
# AWQ's models: every head its own key-value head, so o_proj's scales fold into v_proj too
CONFIGS = {name: {"num_key_value_heads": 4} for name in METHODS if name.startswith("awq")}
NSAMPLES = {"awq-few-tokens": 2}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_narrow_block_writes_the_same_checkpoint(tiny_model, tmp_path, calib_file, monkeypatch, capsys, method):
    src = tiny_model("llama", config={"num_hidden_layers": 2, **CONFIGS.get(method, {})}, dtype=torch.bfloat16)
    head, *rest = METHODS[method]
    args = [head, src, *rest, "--dataset", calib_file, "--nsamples", NSAMPLES.get(method, 8), "--seqlen", 32,
            "--batch-size", 4]
    energies = []
    monkeypatch.setattr(awq, "input_energy", lambda *a: energies.append(1) or real_input_energy(*a))
    assert cli(*args, "-o", tmp_path / "wide") == 0
    assert "block weights:" not in "".join(capsys.readouterr())
    assert bool(energies) == (method == "awq-few-tokens")   # the search measured down_proj on its inputs

    calls = {"wide": 0, "codes": 0}
    for name in calls:
        real = getattr(sequential, f"_{name}_linear")

        def counted(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)
        monkeypatch.setattr(sequential, f"_{name}_linear", counted)
    held: list[torch.dtype] = []
    real_widen = sequential._widen

    def widen(block, names, dtype):
        held.extend(block.get_submodule(n).weight.dtype for n in names)
        real_widen(block, names, dtype)
    monkeypatch.setattr(sequential, "_widen", widen)
    real_estimate = plan_module.estimate_resources
    monkeypatch.setattr(plan_module, "estimate_resources",
                        lambda *a, **k: dataclasses.replace(real_estimate(*a, **k), narrow=True))
    assert cli(*args, "-o", tmp_path / "narrow") == 0
    assert "block weights: the quantized Linears held as stored" in "".join(capsys.readouterr())
    assert digests(tmp_path / "narrow") == digests(tmp_path / "wide")
    assert held and set(held) == {torch.bfloat16}
    assert calls["wide"] > 0 and calls["codes"] > 0


def test_the_plan_holds_the_block_narrow_only_where_it_must(tiny_model, calib_file, monkeypatch):
    src = tiny_model("llama", config={"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "num_hidden_layers": 2}, dtype=torch.bfloat16)
    cal = CalibrationSpec(source=str(calib_file), nsamples=2, seqlen=16)
    roomy, roomy_awq = plan_of(src, "gptq", cal), plan_of(src, "awq", cal)
    assert not roomy.narrow and not roomy_awq.narrow
    narrow_peak = sequential_peak = None
    # activations are a sliver here: only the narrow block brings the peak under the room
    monkeypatch.setattr(plan_module, "memory_room", lambda dev: roomy.host_peak_bytes - 1)
    tight = plan_of(src, "gptq", cal)
    assert tight.narrow and tight.host_peak_bytes < roomy.host_peak_bytes
    assert any(line.startswith("block weights: the quantized Linears held as stored") for line in tight.lines())
    narrow_peak, sequential_peak = tight.host_phases["blocks"], roomy.host_phases["blocks"]
    # the Linears in bf16 instead of float32 at the least, the codes and a Hessian at a time besides
    linears = 4 * (256 * 256 * 2 + 2 * 256 * 128 + 3 * 256 * 1024)
    assert sequential_peak - narrow_peak > linears // 4
    # AWQ too: its search's trial weights and scaled groups in float32, the rest as stored
    monkeypatch.setattr(plan_module, "memory_room", lambda dev: roomy_awq.host_peak_bytes - 1)
    tight_awq = plan_of(src, "awq", cal)
    assert tight_awq.narrow and tight_awq.host_phases["blocks"] < roomy_awq.host_phases["blocks"] - linears // 4
    monkeypatch.setattr(plan_module, "memory_room", lambda dev: 1)      # nothing fits: the usual plan, refused
    assert not plan_of(src, "gptq", cal).narrow


def test_max_memory_makes_the_plan_fit_it_or_refuses_in_one_line(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama", config={"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "num_hidden_layers": 2}, dtype=torch.bfloat16)
    cal = CalibrationSpec(source=str(calib_file), nsamples=2, seqlen=16)
    roomy = plan_of(src, "gptq", cal)
    args = ["gptq", src, "--group-size", 32, "--dataset", calib_file, "--nsamples", 2, "--seqlen", 16]
    assert cli(*args, "-o", tmp_path / "free") == 0
    assert cli(*args, "-o", tmp_path / "capped", "--max-memory", str(roomy.host_peak_bytes - 1)) == 0
    assert "block weights: the quantized Linears held as stored" in "".join(capsys.readouterr())
    assert digests(tmp_path / "capped") == digests(tmp_path / "free")

    assert cli(*args, "-o", tmp_path / "small", "--max-memory", "1MB") == 2
    err = capsys.readouterr().err
    assert "--max-memory allows 1.00 MB" in err and "Traceback" not in err
    assert not (tmp_path / "small").exists()
    assert cli(*args, "-o", tmp_path / "bad", "--max-memory", "lots") == 2
    assert "--max-memory 'lots' is not a size" in capsys.readouterr().err


def test_a_cgroup_limit_caps_the_memory_the_plan_sees(tmp_path, monkeypatch):
    import quantize_llm.run.resources as resources

    monkeypatch.setattr(resources, "CGROUP", tmp_path)
    unlimited = resources.available_memory()
    (tmp_path / "memory.max").write_text("max\n")
    assert resources.available_memory() is not None
    (tmp_path / "memory.max").write_text(f"{3 * 2 ** 30}\n")
    (tmp_path / "memory.current").write_text(f"{2 ** 30}\n")
    assert resources.available_memory() == min(2 * 2 ** 30, unlimited)
    (tmp_path / "memory.current").write_text("not a number\n")
    assert resources.available_memory() is not None
