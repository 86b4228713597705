"""The command line's surface: every command keeps the options, defaults and help texts recorded in
cli_options.json (taken from the commands as they were before their shared options were defined
once). A deliberate change to an option updates that file in the same commit:

    python -c "import json, test_cli_options as t; print(t.recorded_text(t.option_table()))" > tests/cli_options.json

(run from tests/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

RECORD = Path(__file__).with_name("cli_options.json")


def option_table() -> dict[str, dict[str, dict[str, Any]]]:
    """command -> its parameters as click sees them, keyed by their flags ("--sym/--asym", "-o")."""
    import typer

    from quantize_llm.cli import app

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, command in sorted(typer.main.get_command(app).commands.items()):
        params = {}
        for p in command.params:
            flags = " ".join(p.opts) + ("/" + " ".join(p.secondary_opts) if getattr(p, "secondary_opts", None) else "")
            default = str(p.default) if isinstance(p.default, Path) else p.default
            params[flags] = {"kind": p.param_type_name, "default": default,
                             "help": getattr(p, "help", None), "show_default": getattr(p, "show_default", None),
                             "required": p.required, "multiple": p.multiple}
        table[name] = params
    return table


def recorded_text(table: dict) -> str:
    """The table as cli_options.json holds it: one line per option."""
    lines = ["{"]
    for i, (command, params) in enumerate(table.items()):
        lines.append(f"  {json.dumps(command)}: {{")
        for j, (flags, info) in enumerate(params.items()):
            lines.append(f"    {json.dumps(flags)}: {json.dumps(info)}" + ("," if j < len(params) - 1 else ""))
        lines.append("  }" + ("," if i < len(table) - 1 else ""))
    return "\n".join(lines + ["}"])


def test_every_command_keeps_its_options_defaults_and_help():
    want = json.loads(RECORD.read_text(encoding="utf-8"))
    got = json.loads(recorded_text(option_table()))        # through JSON, as recorded (tuples become lists)
    assert sorted(got) == sorted(want)
    for command in want:
        missing = sorted(set(want[command]) - set(got[command]))
        extra = sorted(set(got[command]) - set(want[command]))
        assert not missing and not extra, (command, missing, extra)
        for flags, info in want[command].items():
            assert got[command][flags] == info, (command, flags, got[command][flags], info)


def test_the_five_methods_share_the_run_options():
    """The options every quantizing command takes are the same ones, with the same defaults and help."""
    table = option_table()
    shared = ("--keep-dense", "--device", "--overwrite", "--resume/--no-resume", "--eval", "--eval-windows",
              "--push-to-hub", "--strict-vllm", "--verify/--no-verify", "--max-shard-size", "--log-json")
    for flags in shared:
        seen = [table[c][flags] for c in ("rtn", "gptq", "awq", "outlier", "nf4")]
        assert all(s == seen[0] for s in seen), flags
    calibrated = ("--nsamples", "--seqlen", "--seed", "--text-column", "--batch-size", "--damp", "--block-size",
                  "--true-sequential/--no-true-sequential")
    for flags in calibrated:
        seen = [table[c][flags] for c in ("gptq", "awq", "outlier", "nf4")]
        assert all(s == seen[0] for s in seen), flags
        assert flags not in table["rtn"]


SHARED_ARGS = ["--device", "cpu", "--overwrite", "--no-resume", "--eval-windows", "3", "--push-to-hub", "me/model",
               "--strict-vllm", "--no-verify", "--max-shard-size", "1GB", "--keep-dense", "down_proj",
               "--log-json", "events.jsonl"]
CALIBRATION_ARGS = ["--dataset", "calib.txt", "--nsamples", "3", "--seqlen", "16", "--seed", "5", "--text-column",
                    "body", "--batch-size", "2", "--damp", "0.02", "--block-size", "64", "--no-true-sequential"]
COMMANDS = {"rtn": ["--clip", "mse"], "gptq": ["--act-order", *CALIBRATION_ARGS],
            "awq": ["--then", "gptq", *CALIBRATION_ARGS], "outlier": ["--inner", "gptq", *CALIBRATION_ARGS],
            "nf4": ["--rounding", "gptq", *CALIBRATION_ARGS]}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_option_reaches_the_job_under_its_own_name(command, tmp_path, monkeypatch):
    """Every shared option, set away from its default, arrives in the job the command runs."""
    from test_cli import cli

    import quantize_llm.cli.quantize as commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("some text")
    ran = []
    monkeypatch.setattr(commands, "run_job", lambda job, log_json: ran.append((job, log_json)))
    assert cli(command, "model-folder", "-o", "out", "--eval", "text.txt", *SHARED_ARGS, *COMMANDS[command]) == 0
    (job, log_json), = ran
    assert (job.model, job.output, job.spec.method, log_json) == ("model-folder", Path("out"), command,
                                                                 Path("events.jsonl"))
    assert (job.device, job.overwrite, job.resume, job.push_to_hub, job.strict_vllm, job.verify,
            job.max_shard_size) == ("cpu", True, False, "me/model", True, False, "1GB")
    assert (job.evaluation.dataset, job.evaluation.windows) == ("text.txt", 3)
    assert job.spec.keep_dense == ("down_proj",)
    if command == "rtn":
        assert job.options.clip == "mse" and job.calibration is None
        return
    c = job.calibration
    assert (c.source, c.nsamples, c.seqlen, c.seed, c.text_column, job.batch_size) == ("calib.txt", 3, 16, 5, "body", 2)
    assert (job.options.damp, job.options.block_size, job.options.true_sequential) == (0.02, 64, False)
