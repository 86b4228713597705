"""Runs spread over several devices: the scheduling helpers, the --device list, and byte-identical
checkpoints from one device and from several.

A machine without GPUs checks the logic with CPU workers (`--device cpu,cpu`): batches, replicas
and solves go to different threads exactly as they would go to different GPUs. The `cuda` tests at
the end make the same comparison on real GPUs: two workers on one GPU, and two GPUs where present.
"""
from __future__ import annotations

import threading
import time
from collections import namedtuple

import pytest
import torch
from test_cli import cli, expect_error
from test_resume import deep_model, events, fail_after, same_files  # noqa: F401  (fixture)

import quantize_llm.calibration.sequential as sequential
from quantize_llm.core.devices import map_units, move, resolve_device, resolve_devices, spread
from quantize_llm.errors import UsageError

CPU2 = (torch.device("cpu"), torch.device("cpu"))
CPU3 = CPU2 + (torch.device("cpu"),)


# ---- scheduling ---------------------------------------------------------------------------------

def test_spread_keeps_item_order_and_runs_each_device_in_its_own_thread():
    threads: dict[int, str] = {}

    def work(i, dev):
        time.sleep(0.002 * ((7 * i) % 5))          # finish out of order
        threads[i] = threading.current_thread().name
        return i * i

    assert spread(CPU3, 10, work) == [i * i for i in range(10)]
    assert len({threads[i] for i in range(3)}) == 3                         # three workers
    assert all(threads[i] == threads[i % 3] for i in range(10))             # item i on worker i % 3


def test_spread_consumes_in_item_order_with_bounded_lookahead():
    started, consumed, ahead_seen = [], [], []

    def work(i, dev):
        started.append(i)
        return i

    def consume(i, r):
        time.sleep(0.01)
        ahead_seen.append(max(started) - i)
        consumed.append(r)

    assert spread(CPU2, 12, work, consume=consume, ahead=2) is None
    assert consumed == list(range(12))
    assert max(ahead_seen) <= 2 * 2                                          # n devices x ahead


def test_spread_raises_the_first_failure_and_stops():
    done = []

    def work(i, dev):
        if i == 3:
            raise ValueError("batch 3 failed")
        done.append(i)
        return i

    with pytest.raises(ValueError, match="batch 3 failed"):
        spread(CPU2, 50, work, consume=lambda i, r: None)
    assert len(done) < 49                                                   # the others stopped early
    assert not [t for t in threading.enumerate() if t.name.startswith("quantize-llm-")]


@pytest.mark.parametrize("consume", [None, lambda i, r: None])
def test_a_failure_while_another_worker_is_behind_does_not_hang(consume):
    """Worker 0 is still on item 0 when worker 1 fails item 3: item 2 never runs, and the caller
    gets item 3's error instead of waiting for item 2 forever."""
    def work(i, dev):
        if i == 0:
            time.sleep(0.3)
        if i == 3:
            raise KeyError("item 3")
        return i

    outcome = []

    def call():
        try:
            spread(CPU2, 8, work, consume=consume)
        except KeyError as exc:
            outcome.append(exc)

    runner = threading.Thread(target=call, daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive() and outcome and "item 3" in str(outcome[0])


def test_one_device_runs_in_the_callers_thread():
    here = threading.current_thread().name
    assert map_units((torch.device("cpu"),), lambda item, dev: (item, threading.current_thread().name),
                     ["a", "b"]) == [("a", here), ("b", here)]


def test_move_keeps_shared_tensors_shared_and_named_tuples():
    Pair = namedtuple("Pair", "cos sin")
    cos = torch.ones(2)
    obj = {"position_embeddings": Pair(cos, cos), "mask": [cos, None], "flag": True}
    memo: dict = {}
    moved = move(obj, torch.device("cpu"), memo)
    again = move({"x": cos}, torch.device("cpu"), memo)
    assert isinstance(moved["position_embeddings"], Pair)
    assert moved["position_embeddings"].cos is moved["mask"][0] is again["x"]
    assert moved["mask"][1] is None and moved["flag"] is True


# ---- the --device list --------------------------------------------------------------------------

def test_device_lists(monkeypatch):
    assert resolve_devices("cpu") == (torch.device("cpu"),)
    assert resolve_devices("cpu, cpu") == CPU2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("cuda:0,cuda:1") == (torch.device("cuda", 0), torch.device("cuda", 1))
    for text, message in [("cuda:0,cuda:0", "names cuda:0 twice"), ("cuda,cuda:1", "needs its index"),
                          ("cpu,cuda:1", "mixes CPU and GPU"), ("auto,cuda:1", "names each device"),
                          ("cuda:0,", "names each device"), ("cuda:0,cuda:2", "only 2 GPU")]:
        with pytest.raises(UsageError, match=message):
            resolve_devices(text)
    with pytest.raises(UsageError, match="runs on one device"):
        resolve_device("cuda:0,cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_a_gpu_list_without_cuda_is_one_clear_line(tiny_model, tmp_path, calib_file, capsys):
    expect_error(capsys, ["gptq", tiny_model(), "-o", tmp_path / "out", "--dataset", calib_file,
                          "--device", "cuda:0,cuda:1"], "CUDA is not available")
    assert not (tmp_path / "out").exists()


# ---- the same checkpoint from one device and from several --------------------------------------

CAL = ["--nsamples", 10, "--seqlen", 32, "--batch-size", 3]   # 4 batches, the last one short


@pytest.mark.parametrize("arch,args", [
    ("llama", ["gptq", "--bits", 4, "--group-size", 32, "--act-order"]),
    ("qwen2", ["gptq", "--bits", 3, "--group-size", 16, "--no-true-sequential"]),   # 4 solves side by side
    ("mistral", ["awq", "--bits", 4, "--group-size", 32, "--then", "gptq"]),
    ("llama", ["outlier", "--bits", 3, "--group-size", 32, "--inner", "gptq", "--mode", "channel",
               "--outlier-fraction", 0.05]),
    ("gemma", ["nf4", "--rounding", "gptq"]),
])
def test_several_devices_give_the_same_checkpoint(tiny_model, tmp_path, calib_file, arch, args):
    src = tiny_model(arch)
    common = [*args[:1], src, *args[1:], "--dataset", calib_file, *CAL]
    for name, device in [("one", "cpu"), ("two", "cpu,cpu"), ("three", "cpu,cpu,cpu")]:
        assert cli(*common, "-o", tmp_path / name, "--device", device, "--log-json", tmp_path / f"{name}.jsonl") == 0
    for other in ("two", "three"):
        for f in sorted((tmp_path / "one").glob("*.safetensors")):
            assert f.read_bytes() == (tmp_path / other / f.name).read_bytes(), (other, f.name)
        # The per-layer output errors come from the Hessian sums: equal to the last bit only when
        # the batches were added in the same order (the codes alone rarely show a reordering).
        assert layer_errors(tmp_path / "one.jsonl") == layer_errors(tmp_path / f"{other}.jsonl")


def layer_errors(log) -> list:
    blocks = [e for e in events(log) if e["event"] == "block"]
    errors = [(layer["name"], layer["metrics"].get("rel_error")) for b in blocks for layer in b["layers"]]
    assert errors and all(isinstance(e, float) for _, e in errors)
    return errors


def test_batches_and_solves_really_go_to_other_workers(tiny_model, tmp_path, calib_file, monkeypatch):
    """The forward passes of batches 1, 3 run on the second worker's replica, not the first's."""
    seen: dict[int, set] = {}
    real = sequential._block_forward

    def spy(block, x, kwargs):
        seen.setdefault(id(block), set()).add(threading.current_thread().name)
        return real(block, x, kwargs)

    monkeypatch.setattr(sequential, "_block_forward", spy)
    assert cli("gptq", tiny_model(), "-o", tmp_path / "out", "--dataset", calib_file, *CAL,
               "--device", "cpu,cpu") == 0
    names = set().union(*seen.values())
    assert any(n.startswith("quantize-llm-") for n in names)
    assert len([b for b, threads in seen.items() if len(threads) == 1 and next(iter(threads)).startswith(
        "quantize-llm-")]) >= 2                                             # replicas, each on one worker


def test_a_run_resumed_on_more_devices_matches(deep_model, tmp_path, calib_file, monkeypatch):  # noqa: F811
    args = ["gptq", deep_model, "--group-size", 32, "--dataset", calib_file, *CAL]
    assert cli(*args, "-o", tmp_path / "whole", "--device", "cpu") == 0
    fail_after(monkeypatch, 4)
    assert cli(*args, "-o", tmp_path / "out", "--device", "cpu") == 1
    monkeypatch.undo()
    assert cli(*args, "-o", tmp_path / "out", "--device", "cpu,cpu") == 0
    same_files(tmp_path / "whole", tmp_path / "out")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_give_the_same_checkpoint_as_one(tiny_model, tmp_path, calib_file):
    common = ["gptq", tiny_model("llama"), "--group-size", 32, "--dataset", calib_file, *CAL]
    for name, device in [("one", "cuda:0"), ("two", "cuda:0,cuda:1")]:
        assert cli(*common, "-o", tmp_path / name, "--device", device, "--log-json", tmp_path / f"{name}.jsonl") == 0
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "two/model.safetensors").read_bytes()
    assert layer_errors(tmp_path / "one.jsonl") == layer_errors(tmp_path / "two.jsonl")


@pytest.mark.cuda
def test_two_workers_on_one_gpu_give_the_same_checkpoint(tiny_model, tmp_path, calib_file, monkeypatch):
    import quantize_llm.run.plan as plan

    common = ["gptq", tiny_model("llama"), "--group-size", 32, "--dataset", calib_file, *CAL]
    assert cli(*common, "-o", tmp_path / "one", "--device", "cuda:0", "--log-json", tmp_path / "one.jsonl") == 0
    monkeypatch.setattr(plan, "resolve_devices", lambda text: (torch.device("cuda", 0),) * 2)
    assert cli(*common, "-o", tmp_path / "two", "--device", "cuda:0", "--log-json", tmp_path / "two.jsonl") == 0
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "two/model.safetensors").read_bytes()
    assert layer_errors(tmp_path / "one.jsonl") == layer_errors(tmp_path / "two.jsonl")


def test_the_plan_splits_activations_over_gpus(tiny_model, calib_file):
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.models.architectures import get_architecture
    from quantize_llm.models.load import CheckpointReader, build_skeleton
    from quantize_llm.models.structure import discover
    from quantize_llm.run.plan import plan_blocks, resource_plan

    src = tiny_model("llama")
    spec = QuantSpec(bits=4, group_size=32, method="gptq")
    with CheckpointReader(src) as reader:
        skeleton = build_skeleton(src, reader.config)
        plans = plan_blocks(reader, discover(skeleton), get_architecture(reader.config), skeleton, spec)
        one, two = (resource_plan(reader, plans, spec, reader.config, True, None, 8, torch.device("cuda"), False,
                                  verify=False, devices=n) for n in (1, 2))
    assert two.device_peak_bytes == one.device_peak_bytes - one.activation_bytes // 2
    assert two.host_peak_bytes == one.host_peak_bytes and two.disk_bytes == one.disk_bytes
