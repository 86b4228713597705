"""Recipes: parsing and validation, the shipped configs, job arrays, and one code path with the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize_llm.errors import SpecError, UsageError
from quantize_llm.recipe import load_recipe
from test_cli import cli, expect_error
from test_gptq_pipeline import calib_file  # noqa: F401  (fixture)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").iterdir())


def test_configs_ship_the_common_setups():
    names = {p.name for p in CONFIGS}
    assert {"llama3-8b-gptq-w4g128.toml", "llama3-70b-gptq-w4g128.toml", "qwen2.5-7b-awq.toml",
            "nf4-qlora-base.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    jobs = load_recipe(path)
    assert jobs and all(j.model and j.output for j in jobs)


def test_config_contents_reach_the_job():
    job, = load_recipe(next(p for p in CONFIGS if p.name == "qwen2.5-7b-awq.toml"))
    assert (job.spec.method, job.spec.format, job.spec.bits, job.spec.sym) == ("awq", "awq", 4, False)
    assert job.options.search_samples == 32 and job.calibration.seqlen == 512
    job, = load_recipe(next(p for p in CONFIGS if p.name == "llama3-70b-gptq-w4g128.toml"))
    assert (job.device, job.batch_size, job.max_shard_size, job.spec.act_order) == ("cuda", 4, "5GB", True)


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
    ('[[jobs]\n', "does not parse"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, needle):
    import re

    with pytest.raises(SpecError) as info:
        load_recipe(write(tmp_path, text))
    assert re.search(needle, info.value.one_line()), info.value.one_line()


def test_missing_recipe_and_wrong_suffix(tmp_path, capsys):
    expect_error(capsys, ["run", tmp_path / "nope.toml"], "does not exist")
    expect_error(capsys, ["run", write(tmp_path, "{}", "r.json")], "neither .toml nor .yaml")


def test_defaults_merge_and_inherited_calibration_is_ignored_without_data(tmp_path):
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


def test_run_all_jobs_and_job_index(tiny_model, tmp_path, calib_file):
    src = tiny_model("llama")
    recipe = write(tmp_path, recipe_text(src, tmp_path, calib_file))
    assert cli("run", recipe, "--job-index", 1) == 0
    assert (tmp_path / "gptq" / "config.json").exists() and not (tmp_path / "rtn").exists()
    card = (tmp_path / "gptq" / "README.md").read_text()
    assert f"quantize-llm run {recipe} --job-index 1" in card
    assert cli("run", recipe, "--job-index", 1) == 2            # the output exists: refused, not overwritten
    assert cli("run", recipe, "--check") == 0
    assert not (tmp_path / "rtn").exists()


def test_failing_job_names_itself(tiny_model, tmp_path, calib_file, capsys):
    src = tiny_model("llama")
    recipe = write(tmp_path, recipe_text(src, tmp_path, calib_file).replace(str(calib_file), str(tmp_path / "gone.txt")))
    expect_error(capsys, ["run", recipe], r"job 1 \(gptq\): .*gone.txt")
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
