"""`self` calibration text from an offloaded model: the plan's choice and its memory, the same tokens
as the whole model, the temporary folder, and the options that bound it."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
from test_cli import cli, expect_error, leftovers
from test_plan_phases import plan_of

from quantize_llm.calibration.data import CalibrationSpec
from quantize_llm.errors import SpecError, UsageError
from quantize_llm.models.load import CheckpointReader
from quantize_llm.run.resources import PROCESS_BASELINE, SelfText

FOUR = {"num_hidden_layers": 4}
BLOCK = 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64)   # one tiny float32 decoder block: 147968 bytes


def block_bytes(src: Path, index: int) -> int:
    """Bytes of decoder block `index` in the checkpoint (float32, as the CPU generation loads it)."""
    with CheckpointReader(src) as reader:
        return sum(reader.nbytes(n) for n in reader.names() if n.startswith(f"model.layers.{index}."))


def generate(src: Path, tmp_path: Path, budget: int | None, nsamples: int = 3, seqlen: int = 12, seed: int = 0):
    """Self-generated calibration tokens of `src` on the CPU, the whole model or offloaded to `budget`."""
    from quantize_llm.run.execute import load_calibration_tokens

    with CheckpointReader(src) as reader:
        config = reader.config
    generation = SelfText(weights_bytes=0, cache_bytes=0, budget_bytes=budget)
    spec = CalibrationSpec(nsamples=nsamples, seqlen=seqlen, seed=seed)
    return load_calibration_tokens(src, config, spec, torch.device("cpu"), lambda kind, data: None,
                                   generation=generation, output=tmp_path / "out").tokens


@pytest.fixture
def loaded(monkeypatch):
    """The models load_offloaded returns, each with the offload folder it was given."""
    import quantize_llm.models.sources as sources

    models: list[tuple[torch.nn.Module, Path]] = []
    real = sources.load_offloaded

    def spy(folder, dtype, device_map, offload_folder, trust_remote_code=False):
        model = real(folder, dtype, device_map, offload_folder, trust_remote_code)
        models.append((model, Path(offload_folder)))
        return model
    monkeypatch.setattr(sources, "load_offloaded", spy)
    return models


# ---------------------------------------------------------------------------- the tokens

@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen3"])
def test_offloaded_generation_writes_the_tokens_of_the_whole_model(tiny_model, tmp_path, loaded, arch):
    src = tiny_model(arch, config=FOUR)
    whole = generate(src, tmp_path, None)
    assert not loaded
    for budget in (400_000, BLOCK):         # some blocks kept in memory; every module read from disk
        assert torch.equal(generate(src, tmp_path, budget), whole)
        model, folder = loaded[-1]
        assert "disk" in model.hf_device_map.values()
        assert any(p.device.type == "meta" for p in model.parameters())      # those weights are not resident
        assert folder.parent == tmp_path and folder.name.startswith(".out.tmp-offload-") and not folder.exists()
    assert torch.equal(generate(src, tmp_path, 400_000, seed=1), generate(src, tmp_path, None, seed=1))
    assert not torch.equal(generate(src, tmp_path, 400_000, seed=1), whole)
    assert leftovers(tmp_path) == []


def test_the_offloaded_model_holds_what_the_plan_predicts(tiny_model, tmp_path, loaded):
    src = tiny_model("llama", config=FOUR)
    plan = plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12, generation_memory="400KB"))
    text = plan.self_text
    assert text.offloaded and text.budget_bytes == 400_000
    generate(src, tmp_path, text.budget_bytes)
    model, _ = loaded[-1]
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    assert text.resident_bytes == resident > 0
    assert text.streamed_bytes == block_bytes(src, 3) == BLOCK          # one decoder block is read at a time
    with CheckpointReader(src) as reader:                                 # loading holds the two largest weights
        assert text.load_bytes == reader.nbytes("model.embed_tokens.weight") + reader.nbytes("lm_head.weight")
    assert text.resident_bytes + text.streamed_bytes <= 400_000
    assert plan.host_phases["calibration text"] == PROCESS_BASELINE + resident + BLOCK + text.cache_bytes
    line = next(line for line in plan.lines() if line.startswith("calibration text:"))
    assert "offloaded to disk, at most 400.00 KB of its" in line and "213.50 KB kept" in line


def test_a_bfloat16_checkpoint_is_planned_at_its_float32_size_on_a_cpu(tiny_model, tmp_path, loaded):
    """Weights stored in bfloat16 are loaded (and kept) in float32 on a CPU: twice their stored bytes."""
    src = tiny_model("llama", config=FOUR, dtype=torch.bfloat16)
    plan = plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12, generation_memory="400KB"))
    text = plan.self_text
    assert text.weights_bytes == 723_200 and text.streamed_bytes == 2 * block_bytes(src, 3) == BLOCK
    assert text.load_bytes == 2 * 4 * 256 * 64          # the embeddings and the head, in float32
    generate(src, tmp_path, text.budget_bytes)
    model, _ = loaded[-1]
    kept = [p for p in model.parameters() if p.device.type != "meta"]
    assert {p.dtype for p in kept} == {torch.float32}
    assert text.resident_bytes == sum(p.numel() * p.element_size() for p in kept) == 213_504


def test_generation_that_fails_leaves_no_offload_folder(tiny_model, tmp_path, loaded, monkeypatch):
    import quantize_llm.calibration.data as data

    src = tiny_model("llama", config=FOUR)
    seen = []

    def broken(model, *args, **kwargs):
        seen.extend(leftovers(tmp_path))
        raise RuntimeError("out of memory")
    monkeypatch.setattr(data, "generate_self", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(src, tmp_path, 400_000)
    assert len(seen) == 1 and seen[0].startswith(".out.tmp-offload-")   # it existed while the model ran
    assert leftovers(tmp_path) == []


def test_the_input_device_of_a_model_with_every_weight_on_disk_is_where_it_runs(tiny_model, tmp_path, loaded):
    from quantize_llm.calibration.data import input_device

    src = tiny_model("llama", config=FOUR)
    generate(src, tmp_path, BLOCK)
    model, _ = loaded[-1]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert input_device(model) == torch.device("cpu")


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").is_file(),
                    reason="glibc's allocator, RssAnon from /proc")
def test_weights_read_in_and_dropped_give_their_memory_back():
    """What offloading does at every pass: 8 MB tensors allocated and freed between small ones that
    stay. From glibc's heap (where its threshold, once raised by a larger tensor freed, sends them)
    about 300 MB of the 320 MB stay with the process; inside mapped_allocations none does. Measured
    in a process of its own: the allocator's state after other tests is not this one's to judge."""
    import subprocess
    import sys

    body = """
from pathlib import Path
import torch
from quantize_llm.models.sources import mapped_allocations

def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

freed = torch.ones(24 << 20, dtype=torch.uint8)
del freed                                 # glibc raises its threshold above 24 MB: 8 MB come from the heap
with mapped_allocations():
    before, kept = rss_anon(), []
    for _ in range(40):
        weight = torch.ones(2 << 20)      # 8 MB, as a module's weight read from the checkpoint
        kept.append(torch.ones(1000))     # an activation made after it, still alive
        del weight
    print(rss_anon() - before)
"""
    grown = int(subprocess.run([sys.executable, "-c", body], check=True, capture_output=True, text=True,
                               timeout=120).stdout.split()[-1])
    assert grown < 16 << 20


# ---------------------------------------------------------------------------- the plan's choice

def test_without_a_budget_the_plan_offloads_only_what_does_not_fit(tiny_model, monkeypatch):
    import quantize_llm.run.plan as plan_module

    src = tiny_model("llama", config=FOUR)
    cal = CalibrationSpec(nsamples=3, seqlen=12)
    monkeypatch.setattr(plan_module, "available_memory", lambda: 10 ** 9)
    whole = plan_of(src, "gptq", cal).self_text
    assert not whole.offloaded and whole.work_bytes(cpu=True) == whole.weights_bytes + whole.cache_bytes
    free = 600_000      # the weights (723 KB) do not fit in 80% of it; half of them and the cache do
    monkeypatch.setattr(plan_module, "available_memory", lambda: free)
    text = plan_of(src, "gptq", cal).self_text
    assert text.offloaded and 0 < text.resident_bytes < text.weights_bytes
    assert text.work_bytes(cpu=True) <= plan_module.FREE_SHARE * free
    monkeypatch.setattr(plan_module, "available_memory", lambda: None)       # unknown: as before, whole
    assert not plan_of(src, "gptq", cal).self_text.offloaded
    on_gpu = plan_of(src, "gptq", cal, device="cuda").self_text           # no GPU here: its memory is unknown
    assert not on_gpu.offloaded and on_gpu.weights_bytes == whole.weights_bytes // 2   # bfloat16


def test_a_budget_as_large_as_the_model_loads_it_whole(tiny_model):
    src = tiny_model("llama", config=FOUR)
    text = plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12, generation_memory="1MB")).self_text
    assert not text.offloaded and text.weights_bytes == 723_200 < 1_000_000


def test_when_even_one_block_does_not_fit_the_run_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch,
                                                                             capsys):
    import quantize_llm.run.execute as execute
    import quantize_llm.run.plan as plan_module

    src = tiny_model("llama", config=FOUR)
    monkeypatch.setattr(plan_module, "available_memory", lambda: 100_000)
    text = plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12)).self_text
    assert text.offloaded and text.budget_bytes == BLOCK and text.resident_bytes == 0
    monkeypatch.setattr(execute, "available_memory", lambda: PROCESS_BASELINE + 100_000)
    expect_error(capsys, ["gptq", src, "-o", tmp_path / "out", "--nsamples", 3, "--seqlen", 12, "--group-size", 32],
                 r"writing the calibration text needs about .* of host memory \(147\.97 KB of weights at once, "
                 r"KV cache and logits .*\); .* is available \(pass --dataset with real text, or lower --seqlen")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_whole_model_too_large_for_memory_names_the_offloading_option(tiny_model, tmp_path, monkeypatch, capsys):
    import quantize_llm.run.execute as execute

    src = tiny_model("llama", config=FOUR)
    monkeypatch.setattr(execute, "available_memory", lambda: PROCESS_BASELINE + 100_000)
    expect_error(capsys, ["gptq", src, "-o", tmp_path / "out", "--nsamples", 3, "--seqlen", 12, "--group-size", 32,
                          "--generation-memory", "2MB"],
                 r"writing the calibration text needs .*\(the whole float model 723\.20 KB, .*--generation-memory to "
                 "read most weights from disk")


def test_on_a_gpu_the_budget_is_the_gpus_and_the_host_holds_one_module_at_a_time(tiny_model):
    """Planned on this machine (no GPU needed): bfloat16 weights, none of them kept in host memory."""
    from quantize_llm.models.sources import offload_map

    src = tiny_model("llama", config=FOUR)
    plan = plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12, generation_memory="200KB"), device="cuda")
    text = plan.self_text
    assert text.offloaded and text.weights_bytes == 723_200 // 2 and text.streamed_bytes == BLOCK // 2
    assert plan.device_phases["calibration text"] == text.resident_bytes + BLOCK // 2 + text.cache_bytes
    assert plan.host_phases["calibration text"] == PROCESS_BASELINE + BLOCK // 2      # a block read in
    with CheckpointReader(src) as reader:
        places = offload_map(src, reader.config, torch.bfloat16, 200_000, torch.device("cuda", 1)).device_map
    assert set(places.values()) == {1, "disk"}
    with pytest.raises(SpecError) as info:          # the largest block, and room for one more on the GPU
        plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12, generation_memory="100KB"), device="cuda")
    assert info.value.one_line().endswith("twice over on a GPU (one module must stay there) (give at least "
                                          "147.97 KB, or pass --dataset)")


# ---------------------------------------------------------------------------- bad input

def test_a_budget_below_one_block_is_refused_with_the_least_that_works(tiny_model):
    src = tiny_model("llama", config=FOUR)
    with pytest.raises(SpecError) as info:
        plan_of(src, "gptq", CalibrationSpec(nsamples=3, seqlen=12, generation_memory="100KB"))
    assert info.value.one_line() == ("--generation-memory 100KB is less than model.layers.0, which offloading holds "
                                     "in memory whole (147.97 KB in float32) (give at least 147.97 KB, or pass "
                                     "--dataset)")


@pytest.mark.parametrize("value,needle", [
    ("lots", "--generation-memory 'lots' is not a size"),
    ("0GB", "--generation-memory '0GB' must be positive"),
    (4, "--generation-memory must be a size such as 4GB, not 4"),
])
def test_a_budget_that_is_no_size_is_refused(value, needle):
    with pytest.raises(SpecError) as info:
        CalibrationSpec(generation_memory=value)
    assert info.value.one_line().startswith(needle)


def test_a_budget_with_real_text_is_refused(calib_file):
    with pytest.raises(SpecError) as info:
        CalibrationSpec(source=str(calib_file), generation_memory="4GB")
    assert info.value.one_line() == (f"--generation-memory applies to text the model writes itself, not to the "
                                     f"calibration source {calib_file} (drop --generation-memory, or --dataset)")


def test_an_fp8_source_cannot_be_offloaded(tiny_model, tmp_path):
    from test_sources import make_fp8

    src = tiny_model("llama", dtype=torch.bfloat16)
    make_fp8(src, tmp_path / "fp8", block=(48, 40))
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path / "fp8", "gptq", CalibrationSpec(nsamples=2, seqlen=16, generation_memory="150KB"))
    assert "cannot offload an FP8 checkpoint" in info.value.one_line() and "(pass --dataset" in info.value.one_line()


# ---------------------------------------------------------------------------- commands and recipes

def test_gptq_with_a_generation_budget_writes_the_same_checkpoint(tiny_model, tmp_path, capsys):
    src = tiny_model("llama", config=FOUR)
    common = ["gptq", src, "--nsamples", 3, "--seqlen", 12, "--group-size", 32]
    assert cli(*common, "-o", tmp_path / "whole") == 0
    assert cli(*common, "-o", tmp_path / "offloaded", "--generation-memory", "400KB",
               "--log-json", tmp_path / "events.jsonl") == 0
    assert (tmp_path / "whole/model.safetensors").read_bytes() == (tmp_path / "offloaded/model.safetensors").read_bytes()
    calibration = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["meta"]["calibration"]
                   for d in ("whole", "offloaded")]
    assert calibration[0]["sha256"] == calibration[1]["sha256"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["self_text"]["budget_bytes"] == 400_000 and plan["self_text"]["resident_bytes"] == 213_504
    assert leftovers(tmp_path) == []


def test_the_recipe_key_and_the_plan_command(tiny_model, tmp_path, capsys):
    from quantize_llm.run.recipe import load_recipe

    src = tiny_model("llama", config=FOUR)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[jobs]]\nmodel = "{src}"\noutput = "{tmp_path / "o"}"\nmethod = "gptq"\ngroup_size = 32\n'
                      '[jobs.calibration]\nnsamples = 3\nseqlen = 12\ngeneration_memory = "400KB"\n')
    assert load_recipe(recipe)[0].calibration.generation_bytes == 400_000
    capsys.readouterr()
    assert cli("plan", recipe) == 0
    out = capsys.readouterr().out
    assert "calibration text: generated by the float model offloaded to disk, at most 400.00 KB" in out
    recipe.write_text(recipe.read_text().replace('"400KB"', "400"))
    with pytest.raises(UsageError) as info:
        load_recipe(recipe)
    assert info.value.one_line().endswith("jobs[0].calibration.generation_memory must be a string (or left out), "
                                          "not 400")


def test_the_budget_is_a_calibration_option_of_every_calibrated_command(tiny_model, tmp_path, capsys):
    src = tiny_model("llama", config=FOUR)
    for command in ("gptq", "awq", "nf4", "outlier"):
        expect_error(capsys, [command, src, "-o", tmp_path / "o", "--generation-memory", "lots"],
                     "--generation-memory 'lots' is not a size")
    expect_error(capsys, ["gptq", src, "-o", tmp_path / "o", "--dataset", tmp_path / "c.txt",
                          "--generation-memory", "4GB"], "applies to text the model writes itself")
