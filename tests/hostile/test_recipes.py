"""Hostile recipes: every bad value, table or file a recipe can hold is one line, exit 2, before any
job runs, and leaves the user's folder as it was (an existing output included)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hostile_harness import refused, run_cli, tree

JOB = 'model = "{home}/model"\noutput = "{home}/out"\nmethod = "{method}"\ngroup_size = 32\n'


def recipe(world: Path, body: str, *, method: str = "rtn", name: str = "r.toml") -> Path:
    """world/NAME holding one job (tiny model -> world/out) followed by BODY's lines."""
    path = world / name
    path.write_text("[[jobs]]\n" + JOB.format(home=world, method=method) + body.format(home=world))
    return path


# (body after the job's keys, method, needles of the error line): a value of the wrong type, out of
# range, or one the format cannot hold; each refused by run, run --check and plan, naming the job
VALUE_CASES = [
    ('overwrite = "false"\n', "rtn", (r'jobs\[0\]\.overwrite must be true or false, not the string "false"',)),
    ('sym = "no"\n', "rtn", (r'jobs\[0\]\.sym must be true or false, not the string "no"',)),
    ("bits = 4.0\n", "rtn", (r"jobs\[0\]\.bits must be an integer, not 4\.0",)),
    ('bits = "4"\n', "rtn", (r'jobs\[0\]\.bits must be an integer, not the string "4"',)),
    ("bits = true\n", "rtn", (r"jobs\[0\]\.bits must be an integer, not true",)),
    ('verify = "yes"\n', "rtn", (r"jobs\[0\]\.verify must be true or false",)),
    ("name = 5\n", "rtn", (r"jobs\[0\]\.name must be a string, not 5",)),
    ("device = 0\n", "rtn", (r"jobs\[0\]\.device must be a string, not 0",)),
    ("max_shard_size = 2000000000\n", "rtn", (r"jobs\[0\]\.max_shard_size must be a string",)),
    ("keep_dense = 5\n", "rtn", (r"jobs\[0\]\.keep_dense must be a string or a list of strings",)),
    ('keep_dense = ["lm_head", 3]\n', "rtn", (r"jobs\[0\]\.keep_dense\[1\] must be a string",)),
    ("options = 5\n", "rtn", (r"jobs\[0\]\.options must be a table",)),
    ('calibration = "{home}/calib.txt"\n', "gptq", (r"jobs\[0\]\.calibration must be a table",)),
    ("eval = 5\n", "rtn", (r"jobs\[0\]\.eval must be a text file's path or a table",)),
    ('eval = {{dataset = "{home}/calib.txt", windows = "many"}}\n', "rtn",
     (r'jobs\[0\]\.eval\.windows must be an integer, not the string "many"',)),
    ('eval = {{dataset = "{home}/calib.txt", seqlen = 4}}\n', "rtn", (r"jobs\[0\]: .*eval window of 4 tokens", "512")),
    ("overrides = {{match = 'down'}}\n", "rtn", (r"jobs\[0\]\.overrides must be a list of tables",)),
    ("overrides = [{{match = 'down', bits = '8'}}]\n", "rtn", (r'jobs\[0\]\.overrides\[0\]\.bits must be an integer',)),
    ("overrides = [{{match = 'down', keep_dense = 'yes'}}]\n", "rtn",
     (r'jobs\[0\]\.overrides\[0\]\.keep_dense must be true or false, not the string "yes"',)),
    ("overrides = [{{match = 5, bits = 8}}]\n", "rtn", (r"jobs\[0\]\.overrides\[0\]\.match must be a string",)),
    ('[jobs.options]\ndamp = "high"\n', "gptq", (r'jobs\[0\]\.options\.damp must be a number, not the string "high"',)),
    ("[jobs.options]\nblock_size = 64.0\n", "gptq", (r"jobs\[0\]\.options\.block_size must be an integer",)),
    ('[jobs.options]\nclip = true\n', "rtn", (r"jobs\[0\]\.options\.clip must be a string, not true",)),
    ('[jobs.options]\ngrid = "20"\n', "awq", (r"jobs\[0\]\.options\.grid must be an integer",)),
    ('[jobs.options]\nclip = "yes"\n', "awq", (r"jobs\[0\]\.options\.clip must be true or false",)),
    ('[jobs.options]\nfraction = "1%"\n', "outlier",
     (r"jobs\[0\]\.options\.fraction must be a number \(or left out\)",)),
    ("[jobs.options]\ndamp_max = 5.0\n", "gptq", (r"jobs\[0\]: damp_max 5\.0 must be in \(0, 1\]", "1.0 is the default")),
    ('[jobs.calibration]\nnsamples = "64"\n', "gptq", (r"jobs\[0\]\.calibration\.nsamples must be an integer",)),
    ("[jobs.calibration]\ndataset = 5\n", "gptq", (r"jobs\[0\]\.calibration\.dataset must be a string, not 5",)),
    ("bits = 5\n", "rtn", (r"jobs\[0\]: --bits 5 is not supported", "4 is the usual choice")),
    ("keep_dense = '('\n", "rtn", (r"jobs\[0\]: --keep-dense '\(' is not a valid regular expression",)),
    ("overrides = [{{match = '(', bits = 8}}]\n", "rtn",
     (r"jobs\[0\]: override '\(' is not a valid regular expression",)),
    ("batch_size = 0\n", "gptq", (r"jobs\[0\]: --batch-size 0 must be at least 1", "8 is typical")),
    ("format = 'awq'\nbits = 3\n", "rtn", (r"jobs\[0\]: the awq format stores 4-bit codes only",)),
    ("act_order = true\n[jobs.options]\nstatic_groups = 1\n", "gptq",
     (r"jobs\[0\]\.options\.static_groups must be true or false, not 1",)),
    ("[jobs.options]\nstatic_groups = true\n", "gptq", (r"jobs\[0\]: static groups only change something together "
                                                         r"with act-order", "act_order = true")),
]


@pytest.mark.parametrize("command", [["run"], ["run", "--check"], ["plan"]], ids=["run", "check", "plan"])
@pytest.mark.parametrize("body,method,needles", VALUE_CASES, ids=[c[0].strip() for c in VALUE_CASES])
def test_a_value_of_the_wrong_type_or_range_names_its_key(world, capsys, command, body, method, needles):
    (world / "out").mkdir()                                  # an existing output must survive untouched
    (world / "out" / "keep.txt").write_text("mine")
    path = recipe(world, body, method=method)
    refused(capsys, world, [*command, path], needles=needles)


def test_overwrite_false_as_a_string_leaves_the_existing_output_byte_identical(world, capsys):
    (world / "out").mkdir()
    (world / "out" / "model.safetensors").write_bytes(b"the user's own file")
    path = recipe(world, 'overwrite = "false"\n')
    result = refused(capsys, world, ["run", path], needles=(r"overwrite", "without quotes"))
    assert (world / "out" / "model.safetensors").read_bytes() == b"the user's own file"
    assert "Traceback" not in result.err


def test_defaults_are_checked_under_their_own_name(world, capsys):
    path = world / "r.toml"
    path.write_text('[defaults]\nresume = "no"\n[[jobs]]\n' + JOB.format(home=world, method="rtn"))
    refused(capsys, world, ["run", "--check", path], needles=(r"defaults\.resume must be true or false",))


def test_yaml_values_are_checked_too_and_null_leaves_an_optional_option_out(world, capsys):
    bad = world / "bad.yaml"
    bad.write_text(f"jobs:\n  - model: {world}/model\n    output: {world}/out\n    method: rtn\n    sym: 'no'\n")
    refused(capsys, world, ["run", "--check", bad], needles=(r"jobs\[0\]\.sym must be true or false",))
    good = world / "good.yaml"
    good.write_text(f"jobs:\n  - model: {world}/model\n    output: {world}/out\n    method: outlier\n"
                    f"    group_size: 32\n    options: {{fraction: null, threshold: 2}}\n")
    before = tree(world)
    assert run_cli(capsys, "run", "--check", good).code == 0
    assert tree(world) == before


# A second job whose input is missing or malformed: found before the first job writes anything.
SECOND_JOB_CASES = [
    ('max_shard_size = "lots"\n', (r"jobs\[1\]: --max-shard-size 'lots' is not a size",)),
    ('max_shard_size = "0MB"\n', (r"jobs\[1\]: --max-shard-size '0MB' must be positive",)),
    (f'max_shard_size = "{"9" * 400}"\n', (r"jobs\[1\]: --max-shard-size '9+' is too large",)),
    ('model = "{home}/missing"\n', (r"jobs\[1\]: no such folder: .*missing",)),
    ('model = "missing-model"\n', (r"jobs\[1\]: no such folder: missing-model",)),
    ('model = "{home}/calib.txt"\n', (r"jobs\[1\]: .*calib\.txt is a file",)),
    ('model = "{home}/empty"\n', (r"jobs\[1\]: .*empty has no config\.json",)),
    ('eval = "{home}/nope.txt"\n', (r"jobs\[1\]: --eval .*nope\.txt is not a file",)),
    ('method = "gptq"\ncalibration = {{dataset = "{home}/gone.parquet"}}\n',
     (r"jobs\[1\]: calibration file not found: .*gone\.parquet",)),
    ('method = "gptq"\ncalibration = {{dataset = "gone.txt"}}\n', (r"jobs\[1\]: calibration file not found: gone\.txt",)),
    ('method = "gptq"\ncalibration = {{dataset = "{home}/empty"}}\n', (r"jobs\[1\]: calibration source .*empty is not a file",)),
    ('method = "gptq"\ncalibration = {{dataset = "{home}/model/model.safetensors"}}\n',
     (r"jobs\[1\]: calibration file .*model\.safetensors has an unknown extension '\.safetensors'",)),
]


@pytest.mark.parametrize("command", [["run"], ["run", "--check"], ["plan"]], ids=["run", "check", "plan"])
@pytest.mark.parametrize("second,needles", SECOND_JOB_CASES, ids=[c[0].strip() for c in SECOND_JOB_CASES])
def test_a_later_jobs_input_is_checked_before_the_first_job_runs(world, capsys, command, second, needles):
    (world / "empty").mkdir()
    path = world / "r.toml"
    path.write_text(f"[[jobs]]\n{JOB.format(home=world, method='rtn')}\n[[jobs]]\n{_second(world, second)}")
    refused(capsys, world, [*command, path], needles=needles)


def _second(world: Path, body: str) -> str:
    """The second job: the first one's settings into out2, with BODY's keys replacing them."""
    keys = dict(model=f'"{world}/model"', output=f'"{world}/out2"', method='"rtn"', group_size="32")
    lines = [line for line in body.format(home=world).splitlines() if line]
    for line in lines:
        keys[line.split("=")[0].strip()] = line.split("=", 1)[1].strip()
    return "".join(f"{k} = {v}\n" for k, v in keys.items())


def test_a_recipe_that_is_not_utf8_is_one_line_for_run_and_plan(world, capsys):
    path = world / "r.toml"
    path.write_bytes(b'[[jobs]]\nname = "caf\xe9"\n')
    for command in (["run"], ["run", "--check"], ["plan"]):
        refused(capsys, world, [*command, path], needles=(r"is not UTF-8 text", "save it as UTF-8"))


def test_a_recipe_that_is_a_folder(world, capsys):
    (world / "r.toml").mkdir()
    refused(capsys, world, ["run", world / "r.toml"], needles=(r"r\.toml is a folder",))


def test_batch_size_zero_on_the_command_line_gives_the_range_and_a_typical_value(world, capsys):
    refused(capsys, world, ["gptq", world / "model", "-o", world / "out", "--batch-size", 0,
                            "--dataset", world / "calib.txt"],
            needles=(r"--batch-size 0 must be at least 1", "8 is typical"))


# Refusals that held before the types were checked; kept so they keep holding.
ALREADY_HELD = [
    ("bitz = 4\n", (r"jobs\[0\]: unknown key 'bitz'",)),
    ("[jobs.options]\ndampp = 0.1\n", (r"jobs\[0\]\.options: unknown key 'dampp'",)),
    ("overrides = [{{bits = 8}}]\n", (r"jobs\[0\]\.overrides\[0\]: 'match'.* is missing",)),
    ("overrides = [{{match = 'down', keep_dense = true, bits = 8}}]\n", (r"takes no other setting",)),
    ('device = "gpu0"\n', (r"jobs\[0\]: --device 'gpu0' is not a device",)),
    ("[jobs.calibration]\nnsamples = 3\n", (r"jobs\[0\]: a calibration table was given, but rtn",)),
    ('eval = {{windows = 4}}\n', (r"jobs\[0\]\.eval: 'dataset' \(a text file\) is missing",)),
]


@pytest.mark.parametrize("body,needles", ALREADY_HELD, ids=[c[0].strip() for c in ALREADY_HELD])
def test_refusals_that_already_held(world, capsys, body, needles):
    refused(capsys, world, ["run", recipe(world, body)], needles=needles)


@pytest.mark.parametrize("text,needles", [
    ('[[jobs]]\noutput = "{home}/out"\nmethod = "rtn"\n', (r"jobs\[0\]: 'model' is missing",)),
    ('[[jobs]]\nmodel = "{home}/model"\noutput = "{home}/out"\nmethod = "hqq"\n', (r"method 'hqq' is not known",)),
    ('job = 1\n[[jobs]]\nmodel = "m"\n', (r"unknown key 'job'",)),
    ("jobs = []\n", (r"has no jobs",)),
    ("jobs = [1]\n", (r"jobs\[0\] must be a table of settings, not 1",)),
    ("defaults = 3\njobs = []\n", (r"defaults must be a table of settings, not 3",)),
    ("[[jobs]\n", (r"does not parse",)),
    ('[[jobs]]\nmodel = "{home}/model"\noutput = "{home}/out"\nmethod = "rtn"\n'
     '[[jobs]]\nmodel = "{home}/model"\noutput = "{home}/out"\nmethod = "rtn"\n', (r"two jobs write the same output",)),
])
def test_whole_recipe_refusals(world, capsys, text, needles):
    path = world / "r.toml"
    path.write_text(text.format(home=world))
    refused(capsys, world, ["run", path], needles=needles)


def test_missing_recipe_wrong_suffix_and_job_index(world, capsys):
    refused(capsys, world, ["run", world / "nope.toml"], needles=(r"nope\.toml does not exist",))
    (world / "r.json").write_text("{}")
    refused(capsys, world, ["run", world / "r.json"], needles=(r"neither \.toml nor \.yaml",))
    refused(capsys, world, ["run", recipe(world, ""), "--job-index", 3], needles=(r"--job-index 3 is out of range",))
