"""Recipes: parsing and validation, the shipped configs, job arrays, and one code path with the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import cli, expect_error

from quantize_llm.errors import SpecError, UsageError
from quantize_llm.run.recipe import load_recipe

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").iterdir())


def test_configs_ship_the_common_setups():
    names = {p.name for p in CONFIGS}
    assert {"llama3-8b-gptq-w4g128.toml", "llama3-70b-gptq-w4g128.toml", "qwen2.5-7b-awq.toml",
            "nf4-qlora-base.yaml"} <= names


@pytest.fixture
def configs_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding the local files the shipped configs name (relative to it), since
    loading a recipe checks that a job's local model and calibration file exist."""
    work = tmp_path / "work"
    for name in ("c4_validation.parquet", "../shared/data/c4/c4_validation_2k.parquet"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(b"")
    (work / "SmolLM2-135M-Instruct").mkdir()
    (work / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path, configs_world):
    jobs = load_recipe(path)
    assert jobs and all(j.model and j.output for j in jobs)


def test_a_shipped_config_without_its_files_names_the_job_and_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as info:
        load_recipe(next(p for p in CONFIGS if p.name == "smollm2-methods.toml"))
    assert "jobs[0]: no such folder: SmolLM2-135M-Instruct" in info.value.one_line()
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    with pytest.raises(UsageError) as info:          # job 0 (rtn) reads no data; job 1 (gptq) does
        load_recipe(next(p for p in CONFIGS if p.name == "smollm2-methods.toml"))
    assert "jobs[1]: calibration file not found: ../shared/data/c4/c4_validation_2k.parquet" in info.value.one_line()


def test_config_contents_reach_the_job(configs_world):
    job, = load_recipe(next(p for p in CONFIGS if p.name == "qwen2.5-7b-awq.toml"))
    assert (job.spec.method, job.spec.format, job.spec.bits, job.spec.sym) == ("awq", "awq", 4, False)
    assert job.options.search_samples == 32 and job.calibration.seqlen == 512
    job, = load_recipe(next(p for p in CONFIGS if p.name == "llama3-70b-gptq-w4g128.toml"))
    assert (job.device, job.batch_size, job.max_shard_size, job.spec.act_order) == ("cuda", 4, "5GB", True)
    spread, = load_recipe(next(p for p in CONFIGS if p.name == "llama3-70b-gptq-w4g128-4gpu.toml"))
    assert spread.device == "cuda:0,cuda:1,cuda:2,cuda:3" and spread.spec == job.spec
    assert spread.calibration == job.calibration and spread.output == job.output


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,needle", [
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\nbitz=4\n', "jobs\\[0\\]: unknown key 'bitz'"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="gptq"\n[jobs.options]\ndampp=0.1\n', "jobs\\[0\\].options: unknown key 'dampp'"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="gptq"\n[jobs.calibration]\nsamples=3\n', "calibration: unknown key 'samples'"),
    ('job = 1\n[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\n', "unknown key 'job'"),
    ('[defaults]\nmodl="m"\n[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\n', "defaults: unknown key 'modl'"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="hqq"\n', "method 'hqq' is not known"),
    ('[[jobs]]\nmodel="m"\nmethod="rtn"\n', "'output' is missing"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\nbits=5\n', "--bits 5"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\n[jobs.calibration]\nnsamples=3\n', "uses no data"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\n[[jobs]]\nmodel="n"\noutput="o"\nmethod="rtn"\n', "same output"),
    ('jobs = []\n', "has no jobs"),
    ('[defaults]\ndevice="cuda:0,cuda:0"\n[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\n', "jobs\\[0\\]: --device cuda:0,cuda:0 names cuda:0 twice"),
    ('[[jobs]]\nmodel="m"\noutput="o"\nmethod="rtn"\ndevice="gpu0"\n', "is not a device"),
    ('[[jobs]\n', "does not parse"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, needle):
    import re

    with pytest.raises(UsageError) as info:
        load_recipe(write(tmp_path, text))
    assert re.search(needle, info.value.one_line()), info.value.one_line()


def test_missing_recipe_and_wrong_suffix(tmp_path, capsys):
    expect_error(capsys, ["run", tmp_path / "nope.toml"], "does not exist")
    expect_error(capsys, ["run", write(tmp_path, "{}", "r.json")], "neither .toml nor .yaml")


def test_defaults_merge_and_inherited_calibration_is_ignored_without_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "c.txt").write_text("text")
    jobs = load_recipe(write(tmp_path, """
[defaults]
model = "m"
bits = 3
[defaults.calibration]
dataset = "c.txt"
nsamples = 4
[[jobs]]
output = "a"
method = "rtn"
[[jobs]]
output = "b"
method = "gptq"
bits = 4
[jobs.calibration]
seqlen = 32
"""))
    assert jobs[0].calibration is None and jobs[0].spec.bits == 3
    assert (jobs[1].spec.bits, jobs[1].calibration.source, jobs[1].calibration.nsamples,
            jobs[1].calibration.seqlen) == (4, "c.txt", 4, 32)


def recipe_text(src: Path, out: Path, calib: Path) -> str:
    return f"""
[defaults]
model = "{src}"
group_size = 32
device = "cpu"
[[jobs]]
output = "{out / 'rtn'}"
method = "rtn"
bits = 4
[[jobs]]
output = "{out / 'gptq'}"
method = "gptq"
bits = 3
[jobs.calibration]
dataset = "{calib}"
nsamples = 4
seqlen = 32
"""


def test_run_all_jobs_and_job_index(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    recipe = write(tmp_path, recipe_text(src, tmp_path, calib_file))
    log = tmp_path / "log.jsonl"
    assert cli("run", recipe, "--job-index", 1, "--log-json", log) == 0
    assert (tmp_path / "gptq" / "config.json").exists() and not (tmp_path / "rtn").exists()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["job"] for e in events} == {"gptq"}
    block = next(e for e in events if e["event"] == "block")
    assert block["peak_rss_mb"] > 0 and block["timings"]["solve"] > 0 and block["peak_device_mb"] is None
    card = (tmp_path / "gptq" / "README.md").read_text()
    assert f"quantize-llm run {recipe} --job-index 1" in card
    assert cli("run", recipe, "--job-index", 1) == 2            # the output exists: refused, not overwritten
    capsys.readouterr()
    assert cli("run", recipe, "--check") == 0
    listed = [line.split("│")[1:4] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in row] for row in listed] == [["0", "rtn", "rtn"], ["1", "gptq", "gptq"]]
    assert not (tmp_path / "rtn").exists()


def test_failing_job_names_itself(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    recipe = write(tmp_path, recipe_text(src, tmp_path, calib_file).replace(str(calib_file), str(tmp_path / "gone.txt")))
    expect_error(capsys, ["run", recipe], r"jobs\[1\]: calibration file not found: .*gone.txt")
    assert not (tmp_path / "rtn").exists()                      # found before job 0 started
    (tmp_path / "gone.txt").write_text("")                      # there, but empty: found when job 1 reads it
    expect_error(capsys, ["run", recipe], r"job 1 \(gptq\): .*gone.txt holds no documents")
    assert (tmp_path / "rtn" / "config.json").exists()          # job 0 ran before job 1 failed
    expect_error(capsys, ["run", recipe, "--job-index", 7], "out of range.*2 job")


def test_yaml_recipe_and_the_command_line_are_one_code_path(tiny_model, tmp_path, calib_file):
    src = tiny_model("qwen2")
    assert cli("awq", src, "-o", tmp_path / "cli", "--bits", 4, "--group-size", 32, "--dataset", calib_file,
               "--nsamples", 4, "--seqlen", 32, "--then", "gptq") == 0
    recipe = write(tmp_path, f"""
jobs:
  - model: {src}
    output: {tmp_path / 'yaml'}
    method: awq
    bits: 4
    group_size: 32
    options: {{then: gptq}}
    calibration: {{dataset: {calib_file}, nsamples: 4, seqlen: 32}}
""", "r.yaml")
    assert cli("run", recipe) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "yaml" / name).read_bytes()
    meta = json.loads((tmp_path / "yaml" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["options"]["then"] == "gptq"


def rtn_reference(src: Path, widths):
    """The source model with each Linear for which widths(name) gives (bits, group size) replaced
    by its symmetric float64 RTN reference."""
    import torch
    from reference import dequant_f64, rtn_f64
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and widths(name) is not None:
            bits, gs = widths(name)
            codes, scale, zero, _ = rtn_f64(module.weight.data, bits, gs, True, 0)
            module.weight.data = dequant_f64(codes, scale, zero, torch.arange(module.in_features) // gs).float()
    return model


def test_mixed_precision_overrides(tiny_model, tmp_path, capsys):
    """8-bit down_proj, 4-bit elsewhere, block 0's attention dense: decoded per module, and the
    loaded model computes the float64 RTN reference of each module at its own width."""
    import torch
    from safetensors.torch import load_file

    from quantize_llm import load_quantized

    src = tiny_model("llama")
    recipe = write(tmp_path, f"""
[[jobs]]
model = "{src}"
output = "{tmp_path / 'mixed'}"
method = "rtn"
bits = 4
group_size = 32
[[jobs.overrides]]
match = 'mlp\\.down_proj$'
bits = 8
group_size = 64
[[jobs.overrides]]
match = '^model\\.layers\\.0\\.self_attn\\.'
keep_dense = true
""")
    assert cli("run", recipe) == 0
    out = tmp_path / "mixed"
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["dynamic"]["+:^model\\.layers\\.1\\.mlp\\.down_proj$"] == {"bits": 8, "group_size": 64, "sym": True}
    assert "-:^model\\.layers\\.0\\.self_attn\\.q_proj$" in qconfig["dynamic"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.qweight"].shape == (128 * 8 // 32, 64)     # 8-bit rows
    assert tensors["model.layers.1.mlp.up_proj.qweight"].shape == (64 * 4 // 32, 128)       # 4-bit rows
    assert "model.layers.0.self_attn.q_proj.weight" in tensors

    reference = rtn_reference(src, lambda name: None if ".layers." not in name or name.startswith(
        "model.layers.0.self_attn") else (8, 64) if name.endswith("down_proj") else (4, 32))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(out, dtype=torch.float32)(ids).logits, reference(ids).logits,
                                   rtol=0, atol=2e-5)
    capsys.readouterr()
    assert cli("inspect", out) == 0
    assert "mlp.down_proj (x2) │    8 │    64" in capsys.readouterr().out
    assert "| per-module overrides (first match wins) | `mlp\\.down_proj$`: bits 8, group_size 64 |" in \
        (out / "README.md").read_text()


def test_gptq_with_an_override_inside_a_shared_input_group(tiny_model, tmp_path, calib_file):
    """k_proj at 8 bits while q/v stay at 4: they share an input but are solved per spec."""
    from safetensors.torch import load_file

    from quantize_llm.formats import module_qconfig
    from quantize_llm.formats.gptq import GPTQFormat

    src = tiny_model("llama")
    recipe = write(tmp_path, f"""
[[jobs]]
model = "{src}"
output = "{tmp_path / 'out'}"
method = "gptq"
bits = 4
group_size = 32
overrides = [{{match = 'k_proj', bits = 8}}]
calibration = {{dataset = "{calib_file}", nsamples = 4, seqlen = 32}}
""")
    assert cli("run", recipe) == 0
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for name, bits in (("self_attn.k_proj", 8), ("self_attn.q_proj", 4)):
        prefix = f"model.layers.1.{name}"
        qw = GPTQFormat.decode({t: tensors[f"{prefix}.{t}"] for t in GPTQFormat.tensor_names},
                               module_qconfig(qconfig, prefix))
        assert qw.spec.bits == bits and int(qw.codes.max()) < 2 ** bits


@pytest.mark.parametrize("extra,needle", [
    ("format = 'awq'\ngroup_size = 32\noverrides = [{match = 'down', group_size = 64}]", "cannot hold per-module overrides"),
    ("overrides = [{match = 'down', bits = 5}]", "override 'down': --bits 5"),
    ("overrides = [{match = 'down', bitz = 8}]", "unknown key 'bitz'"),
    ("overrides = [{bits = 8}]", "'match'"),
    ("overrides = [{match = 'down', keep_dense = true, bits = 8}]", "takes no other setting"),
])
def test_bad_overrides(tiny_model, tmp_path, capsys, extra, needle):
    src = tiny_model("llama")
    recipe = write(tmp_path, f'[[jobs]]\nmodel = "{src}"\noutput = "{tmp_path / "o"}"\nmethod = "rtn"\n{extra}\n')
    expect_error(capsys, ["run", recipe], needle)
    assert not (tmp_path / "o").exists()


def test_plan_prints_memory_disk_and_time(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    recipe = write(tmp_path, recipe_text(src, tmp_path, calib_file))
    capsys.readouterr()
    assert cli("plan", recipe, "--time") == 0
    text = capsys.readouterr().out
    assert text.count("disk:") == 2 and "resume state" in text and "host memory peak" in text
    assert "the first block took" in text and "expected total" in text
    assert not (tmp_path / "rtn").exists() and not (tmp_path / "gptq").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("tmp")] == []


def test_disk_check_counts_the_resume_state(tiny_model, tmp_path, monkeypatch, capsys):
    import shutil as shutil_mod

    import quantize_llm.run.execute as execute

    src = tiny_model("llama")
    real = shutil_mod.disk_usage
    out_bytes = {}

    def fake_usage(path):
        usage = real(path)
        return usage._replace(free=out_bytes.get("free", usage.free))
    monkeypatch.setattr(execute.shutil, "disk_usage", fake_usage)
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.run.plan import plan_run
    from quantize_llm.run.recipe import Job

    resources = plan_run(Job("out", str(src), tmp_path / "out", QuantSpec(group_size=32), device="cpu")).resources
    out_bytes["free"] = int(resources.output_bytes * 1.5)                 # the output fits, not with resume state
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out", "--group-size", 32], "resume state.*--no-resume")
    assert not (tmp_path / "out").exists()


def test_lm_head_quantized_to_8_bits(tiny_model, tmp_path, capsys):
    import torch

    from quantize_llm import load_quantized
    from quantize_llm.runtime.qlinear import QuantLinear

    src = tiny_model("llama")                                       # untied head
    recipe = write(tmp_path, f"""
[[jobs]]
model = "{src}"
output = "{tmp_path / 'out'}"
method = "rtn"
bits = 4
group_size = 32
overrides = [{{match = '^lm_head$', bits = 8, group_size = 64}}]
""")
    assert cli("run", recipe) == 0
    qconfig = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qconfig["lm_head"] is True and qconfig["dynamic"]["+:^lm_head$"] == {"bits": 8, "group_size": 64, "sym": True}
    model = load_quantized(tmp_path / "out", dtype=torch.float32)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    reference = rtn_reference(src, lambda name: (8, 64) if name == "lm_head" else (4, 32))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=2e-5)


def test_tied_lm_head_cannot_be_quantized(tiny_model, tmp_path, capsys):
    src = tiny_model("llama-tied")
    recipe = write(tmp_path, f'[[jobs]]\nmodel = "{src}"\noutput = "{tmp_path / "o"}"\nmethod = "rtn"\n'
                             f"group_size = 32\noverrides = [{{match = 'lm_head', bits = 8}}]\n")
    expect_error(capsys, ["run", recipe], "shares its weight with the input embeddings")


def test_method_override_rtn_inside_gptq(tiny_model, tmp_path, calib_file):
    """down_proj rounded to nearest inside a GPTQ run: it equals plain RTN of the weight GPTQ left it."""
    from safetensors.torch import load_file

    src = tiny_model("llama")
    common = f'model = "{src}"\nbits = 4\ngroup_size = 32\nsym = true\n'
    cal = f'calibration = {{dataset = "{calib_file}", nsamples = 4, seqlen = 32}}\n'
    recipe = write(tmp_path, f'[[jobs]]\noutput = "{tmp_path / "mixed"}"\nmethod = "gptq"\n{common}{cal}'
                             f"overrides = [{{match = 'down_proj', method = 'rtn'}}]\n"
                             f'[[jobs]]\noutput = "{tmp_path / "rtn"}"\nmethod = "rtn"\n{common}')
    assert cli("run", recipe) == 0
    mixed, rtn = load_file(tmp_path / "mixed" / "model.safetensors"), load_file(tmp_path / "rtn" / "model.safetensors")
    # block 0's down_proj sees the source weight (nothing before it in the block changes it): same bytes as RTN
    assert torch.equal(mixed["model.layers.0.mlp.down_proj.qweight"], rtn["model.layers.0.mlp.down_proj.qweight"])
    assert not torch.equal(mixed["model.layers.0.mlp.up_proj.qweight"], rtn["model.layers.0.mlp.up_proj.qweight"])
    qconfig = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert "dynamic" not in qconfig                              # same grid everywhere: nothing to record


@pytest.mark.parametrize("method,override,needle", [
    ("awq", "rtn", "not supported in awq runs"),
    ("gptq", "awq", "method 'awq' inside a gptq run"),
])
def test_method_overrides_that_are_refused(tiny_model, tmp_path, capsys, method, override, needle):
    recipe = write(tmp_path, f'[[jobs]]\nmodel = "{tiny_model("llama")}"\noutput = "{tmp_path / "o"}"\n'
                             f'method = "{method}"\ngroup_size = 32\noverrides = [{{match = "down", method = "{override}"}}]\n')
    expect_error(capsys, ["run", recipe], needle)


def _job(**keys):
    """A job from these keys (model and output given), through the recipes' validation."""
    from quantize_llm.run.recipe import job_from_dict

    return job_from_dict({"model": "m", "output": "o", **keys}, "jobs[0]")


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "nf4", "outlier"])
def test_every_option_field_has_its_type_checked(method):
    """Each Options field (whatever fields are added later) refuses a list, naming itself."""
    import dataclasses

    from quantize_llm.run.recipe import _options_class

    for field in dataclasses.fields(_options_class(method)):
        with pytest.raises(SpecError) as info:
            _job(method=method, options={field.name: [1]})
        assert f"jobs[0].options.{field.name} must be " in info.value.message, info.value.message
        assert info.value.message.endswith("not a list")


@pytest.mark.parametrize("key", ["bits", "group_size", "sym", "act_order", "format", "quant_type", "blocksize",
                                 "double_quant", "device", "overwrite", "max_shard_size", "batch_size", "resume",
                                 "strict_vllm", "verify", "name", "model", "method", "push_to_hub", "output",
                                 "keep_dense", "options", "calibration", "overrides", "eval"])
def test_every_job_key_has_its_type_checked(key):
    with pytest.raises(SpecError) as info:
        _job(**{"method": "rtn", key: 1.5})
    assert info.value.message.startswith(f"jobs[0].{key} must be ") and info.value.message.endswith("not 1.5")


@pytest.mark.parametrize("value,phrase", [
    (True, "an integer, not true"), (4.0, "an integer, not 4.0"), ("4", 'an integer, not the string "4"'),
])
def test_a_bool_or_a_float_or_a_string_is_not_an_integer(value, phrase):
    with pytest.raises(SpecError) as info:
        _job(method="rtn", bits=value)
    assert info.value.message == f"jobs[0].bits must be {phrase}"


def test_numbers_take_integers_as_floats_and_optional_options_take_null():
    job = _job(method="gptq", options={"damp": 1, "damp_max": 1})
    assert job.options.damp == 1.0 and type(job.options.damp) is float and type(job.options.damp_max) is float
    job = _job(method="outlier", options={"fraction": None, "threshold": 3})
    assert job.options.fraction is None and job.options.threshold == 3.0
    with pytest.raises(SpecError, match=r"options\.damp must be a number, not null"):
        _job(method="gptq", options={"damp": None})
    assert _job(method="rtn", bits=None).spec.bits == 4          # a job key set to null takes its default


def test_static_groups_need_act_order_and_then_store_no_g_idx():
    job = _job(method="gptq", act_order=True, options={"static_groups": True})
    assert job.spec.act_order is False and job.options.static_groups is True
    assert _job(method="gptq", act_order=True, format="compressed-tensors", options={"static_groups": True})
    with pytest.raises(SpecError, match="add --static-groups"):
        _job(method="gptq", act_order=True, format="compressed-tensors")
    with pytest.raises(SpecError, match="static groups only change something together with act-order"):
        _job(method="gptq", options={"static_groups": True})


def test_static_groups_with_act_order_are_one_thing_on_the_command_line_and_in_a_recipe(tiny_model, tmp_path,
                                                                                         calib_file):
    """README: --act-order quantizes columns in decreasing activation order; --static-groups keeps
    the groups on the original columns (trivial g_idx). The command and its recipe write the same
    bytes, and the weights are those of act-order GPTQ with static groups on the model's own inputs."""
    from test_gptq_pipeline import decoded, reference_gptq
    from transformers import AutoTokenizer

    from quantize_llm.algorithms.gptq import GPTQOptions
    from quantize_llm.calibration.data import read_documents, select_samples
    from quantize_llm.core.spec import QuantSpec
    from quantize_llm.models.load import CheckpointReader

    src = tiny_model("llama")
    assert cli("gptq", src, "-o", tmp_path / "cli", "--act-order", "--static-groups", "--group-size", 32, "--asym",
               "--block-size", 16, "--dataset", calib_file, "--nsamples", 4, "--seqlen", 32) == 0
    recipe = write(tmp_path, f"""
[[jobs]]
model = "{src}"
output = "{tmp_path / 'recipe'}"
method = "gptq"
group_size = 32
sym = false
act_order = true
options = {{static_groups = true, block_size = 16}}
calibration = {{dataset = "{calib_file}", nsamples = 4, seqlen = 32}}
""")
    assert cli("run", recipe) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "recipe" / name).read_bytes(), name
    qconfig = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert qconfig["desc_act"] is False and qconfig["static_groups"] is True
    with CheckpointReader(tmp_path / "cli") as reader:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            g_idx = reader.read(f"{name}.g_idx")
            assert torch.equal(g_idx, (torch.arange(g_idx.numel()) // 32).to(g_idx.dtype))
    tokens, _ = select_samples(read_documents(str(calib_file)), AutoTokenizer.from_pretrained(src), 4, 32)
    spec = QuantSpec(method="gptq", bits=4, group_size=32, sym=False, act_order=True, min_zero=1)
    want = reference_gptq(src, tokens, spec, GPTQOptions(block_size=16, static_groups=True), batch_size=8)
    got = decoded(tmp_path / "cli")
    for name in want:
        same = torch.isclose(got[name], want[name], rtol=0, atol=1e-6).float().mean()
        assert same > 0.995, (name, float(same))
