"""Calibration activations kept where they fit: the plan moves them to the host (a GPU run) or to
files on disk (a CPU run) when the device has no room for them, says so, and the run writes the
same checkpoint; the stores give every batch back as it was, and the resume state's inputs are
written a batch at a time and read back a batch at a time."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli
from test_plan_phases import plan_of

import quantize_llm.calibration.activations as activations
import quantize_llm.run.plan as plan_module
from quantize_llm.calibration.activations import Activations, save_batches
from quantize_llm.calibration.data import CalibrationSpec
from quantize_llm.run.resume import SavedBatches

CPU = (torch.device("cpu"),)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g).to(torch.bfloat16)]


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_stores_give_the_batches_back(tmp_path, where):
    store = Activations.of(batches(), where, CPU, tmp_path)
    assert len(store) == 2 and [store.shape(i) for i in range(2)] == [(2, 5, 8), (1, 5, 8)]
    for got, want in zip(store, batches(), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(store.on(torch.device("cpu"))[1], batches()[1])
    assert len(list(tmp_path.iterdir())) == (2 if where == "disk" else 0)
    store.release()
    assert len(store) == 0 and not list(tmp_path.iterdir())


def test_disk_needs_a_folder_and_places_are_named():
    with pytest.raises(ValueError, match="need a folder"):
        Activations("disk", CPU)
    with pytest.raises(ValueError, match="cannot be kept on 'gpu'"):
        Activations("gpu", CPU)


@pytest.mark.parametrize("kept_on_disk", [False, True])
def test_saved_batches_are_a_safetensors_file_read_a_batch_at_a_time(tmp_path, kept_on_disk):
    (tmp_path / "store").mkdir()
    source = Activations.of(batches(), "disk", CPU, tmp_path / "store") if kept_on_disk else batches()
    save_batches(tmp_path / "inputs.safetensors", source)
    whole = load_file(str(tmp_path / "inputs.safetensors"))             # safetensors' own reader
    assert sorted(whole) == ["0", "1"]
    saved = SavedBatches(tmp_path / "inputs.safetensors")
    assert len(saved) == 2
    for i, want in enumerate(batches()):
        assert torch.equal(whole[str(i)], want) and torch.equal(saved[i], want)
    with pytest.raises(IndexError):
        saved[2]


def test_a_gpu_run_without_room_keeps_activations_on_the_host(tiny_model, calib_file, monkeypatch):
    src = tiny_model("llama")
    cal = CalibrationSpec(source=str(calib_file), nsamples=64, seqlen=32)
    roomy = plan_of(src, "gptq", cal, device="cuda")
    assert roomy.activations == "device"
    monkeypatch.setattr(plan_module, "memory_room", lambda dev: roomy.device_peak_bytes - 1)
    tight = plan_of(src, "gptq", cal, device="cuda")
    assert tight.activations == "host"
    monkeypatch.setattr(plan_module, "memory_room", lambda dev: 1)   # nothing fits: moving them would not help
    assert plan_of(src, "gptq", cal, device="cuda").activations == "device"
    batch = 2 * 4 * 8 * 32 * 64                                         # one batch of 8 in and out
    assert roomy.device_phases["blocks"] - tight.device_phases["blocks"] == roomy.activation_bytes - batch
    assert tight.host_phases["blocks"] - roomy.host_phases["blocks"] == roomy.activation_bytes
    assert any("kept on the host" in line for line in tight.lines())


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method", [["gptq", "--group-size", 32], ["awq", "--group-size", 32]])
def test_a_cpu_run_without_room_keeps_activations_on_disk(tiny_model, tmp_path, calib_file, monkeypatch, capsys,
                                                          method):
    src = tiny_model("llama", config={"num_hidden_layers": 3})
    args = [*method, src, "--dataset", calib_file, "--nsamples", 12, "--seqlen", 32, "--batch-size", 4]
    assert cli(*args, "-o", tmp_path / "memory") == 0
    assert "kept in files" not in "".join(capsys.readouterr())

    written: list[Path] = []
    real = Activations.append

    def append(self, x):
        real(self, x)
        if self.where == "disk":
            written.append(self._items[-1][0])
    monkeypatch.setattr(activations.Activations, "append", append)
    # a tiny model's peak is not its activations: keep them on disk as a machine without room would
    real_estimate = plan_module.estimate_resources

    def on_disk(*a, **k):
        plan = real_estimate(*a, **k)
        return dataclasses.replace(plan, activations="disk", offload_bytes=plan.activation_bytes)
    monkeypatch.setattr(plan_module, "estimate_resources", on_disk)
    assert cli(*args, "-o", tmp_path / "disk") == 0
    assert "calibration activations: kept in files beside the output" in "".join(capsys.readouterr())
    assert digests(tmp_path / "disk") == digests(tmp_path / "memory")
    assert len(written) == 3 * (1 + 3)         # 3 batches: block 0's inputs, then each of 3 blocks' outputs
    assert not any(p.exists() for p in written)                         # and their folder is gone
    assert not [p for p in tmp_path.iterdir() if "activations" in p.name]
