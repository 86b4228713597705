"""Hostile outputs, locks, logs and messages: nothing the user had is destroyed, whatever the flags."""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import pytest
from hostile_harness import assert_one_line_error, assert_untouched, half_written, refused, run_cli, tree


def quantized(world: Path, capsys, name: str = "q") -> Path:
    """A quantized checkpoint of the world's model, written before the snapshot."""
    assert run_cli(capsys, "rtn", world / "model", "-o", world / name, "--group-size", 32).code == 0
    return world / name


@pytest.mark.parametrize("out,cwd,needles", [
    ("", ".", ("is empty",)),
    (".", ".", ("current folder",)),
    ("./", ".", ("current folder",)),
    ("..", "model", ("parent of the current folder",)),
    ("../..", "model", ("parent of the current folder",)),
    ("model", ".", ("is the model folder",)),
    ("model/", ".", ("is the model folder",)),
    ("model/sub", ".", ("inside the model folder",)),
    ("{home}", "/", ("holds the model folder",)),
    ("link-to-model", ".", ("is the model folder",)),
    ("notes", ".", ("holds no checkpoint",)),
    ("/", ".", ("filesystem root|parent of the current folder",)),
])
@pytest.mark.parametrize("command", ["rtn", "gptq"])
def test_outputs_that_would_destroy_something_are_refused_even_with_overwrite(world, capsys, out, cwd, needles,
                                                                               command):
    (world / "link-to-model").symlink_to(world / "model")
    (world / "notes").mkdir()
    (world / "notes" / "todo.txt").write_text("mine")
    extra = ["--dataset", world / "calib.txt", "--nsamples", 4, "--seqlen", 16] if command == "gptq" else []
    refused(capsys, world, [command, world / "model", "-o", out.format(home=world), "--overwrite", *extra],
            needles=needles, cwd=world if cwd == "." else world / cwd if cwd != "/" else Path("/"))


def test_home_folder_is_refused(world, capsys, monkeypatch):
    home = world / "fake-home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1\n")
    monkeypatch.setenv("HOME", str(home))
    refused(capsys, world, ["rtn", world / "model", "-o", "~", "--overwrite"], needles=("home folder",))


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_convert_never_writes_over_its_source(world, capsys, where):
    q = quantized(world, capsys)
    out = {"same": q, "inside": q / "sub", "holds": world}[where]
    refused(capsys, world, ["convert", q, "-o", out, "--format", "compressed-tensors", "--overwrite"],
            needles=("model folder",), cwd=Path("/"))


def test_recipe_output_equal_to_its_model_is_refused(world, capsys):
    recipe = world / "r.toml"
    recipe.write_text(f'[[jobs]]\nmodel = "{world / "model"}"\noutput = "{world / "model"}"\nmethod = "rtn"\n'
                      'group_size = 32\noverwrite = true\n')
    refused(capsys, world, ["run", recipe], needles=("model folder",))


def test_overwrite_replaces_an_earlier_checkpoint(world, capsys):
    q = quantized(world, capsys)
    before = tree(world)
    assert run_cli(capsys, "rtn", world / "model", "-o", q, "--group-size", 64, "--overwrite").code == 0
    after = tree(world)
    assert after["q/model.safetensors"] != before["q/model.safetensors"]
    assert {k for k in after if not k.startswith("q/")} == {k for k in before if not k.startswith("q/")}
    assert half_written(world) == []


def test_names_and_paths_too_long_for_the_filesystem(world, capsys):
    refused(capsys, world, ["rtn", world / "model", "-o", world / ("x" * 250)], needles=("name is 250 bytes",))
    deep = world / "/".join(["d" * 200] * 21)
    refused(capsys, world, ["rtn", world / "model", "-o", deep], needles=("path is .* bytes long",))


@pytest.mark.parametrize("log,needles", [(".", ("is a folder",)), ("missing/log.jsonl", ("cannot write",))])
def test_log_json_that_cannot_be_written(world, capsys, log, needles):
    refused(capsys, world, ["rtn", world / "model", "-o", world / "out", "--log-json", world / log], needles=needles)


@pytest.mark.parametrize("name", ["x[/x]y", "[begin, end]", "[[jobs]]", "a[bold]b", r"re\[0-9]+$"])
def test_user_text_is_printed_as_text_not_markup(world, capsys, name):
    missing = world / name
    result = refused(capsys, world, ["rtn", missing, "-o", world / "out"], needles=())
    assert name in result.error


def test_markup_in_a_written_path_and_in_tables(world, capsys):
    src = world / "my[x]model[b]"
    (world / "model").rename(src)
    result = run_cli(capsys, "rtn", src, "-o", world / "out[bold]", "--group-size", 32)
    assert result.code == 0, result.err
    assert f"wrote {world / 'out[bold]'}" in result.out
    result = run_cli(capsys, "inspect", world / "out[bold]")
    assert result.code == 0 and "out[bold]" in result.out


@pytest.mark.parametrize("value,traceback", [("1", True), ("true", True), ("0", False), ("", False), ("no", False)])
def test_debug_keeps_the_exit_code_and_the_hint(world, capsys, monkeypatch, value, traceback):
    monkeypatch.setenv("QUANTIZE_LLM_DEBUG", value)
    before = tree(world)
    result = run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--bits", 5)
    assert result.code == 2
    assert ("Traceback" in result.err) == traceback
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(choose one of" in errors[0]
    assert_untouched(before, world)


def test_a_held_lock_refuses_and_names_the_holder(world, capsys):
    from quantize_llm.run.resume import OutputLock

    with OutputLock(world / "out"):
        before = tree(world)
        result = run_cli(capsys, "rtn", world / "model", "-o", world / "out")
        assert_untouched(before, world)
    assert_one_line_error(result, 2, "another run", f"process {os.getpid()}", "wait for it")
    assert half_written(world) == []


def test_the_lock_is_taken_before_calibration(world, capsys, monkeypatch):
    import quantize_llm.run.execute as pipeline
    from quantize_llm.run.resume import OutputLock

    def never(*args, **kwargs):
        raise AssertionError("calibration ran although the output was locked")
    monkeypatch.setattr(pipeline, "load_calibration_tokens", never)
    with OutputLock(world / "out"):
        result = run_cli(capsys, "gptq", world / "model", "-o", world / "out", "--dataset", world / "calib.txt")
    assert_one_line_error(result, 2, "another run")
    assert half_written(world) == []


def test_a_stale_lock_file_from_a_killed_run_does_not_block(world, capsys):
    (world / ".out.lock").write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}')
    assert run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32).code == 0
    assert half_written(world) == []


def test_a_killed_runs_temporary_folder_is_removed_even_without_resume(world, capsys):
    stale = world / ".out.tmp-deadbeef"
    stale.mkdir()
    (stale / "shard-00001.align4.bin").write_bytes(b"\0" * 64)
    result = run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32, "--no-resume")
    assert result.code == 0, result.err
    assert half_written(world) == []


def test_a_live_runs_temporary_folder_is_never_removed(world, capsys):
    """A second run (the lock file deleted under the first) must not sweep the first one's files."""
    live = world / ".out.tmp-12345678"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)                # what the first run's writer holds
    try:
        assert run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32).code == 0
        assert live.is_dir()
    finally:
        os.close(fd)


def test_output_honours_the_umask(world, capsys):
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32).code == 0
    finally:
        os.umask(old)
    assert (world / "out").stat().st_mode & 0o777 == 0o755
    assert (world / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_memory_is_checked_before_calibration_data_is_prepared(world, capsys, monkeypatch):
    import quantize_llm.run.execute as pipeline

    def never(*args, **kwargs):
        raise AssertionError("calibration data was prepared for a run that cannot fit")
    monkeypatch.setattr(pipeline, "load_calibration_tokens", never)
    result = refused(capsys, world, ["gptq", world / "model", "-o", world / "out", "--dataset", world / "calib.txt",
                                     "--nsamples", 10 ** 9, "--no-resume"],
                     needles=("calibration activations, which do not fit in memory", "is free", "--nsamples"))
    assert "plan: host memory peak" in result.err and "resume state" not in result.error
    # with the activations on disk allowed for, memory is still checked before any data is prepared
    monkeypatch.setattr(pipeline, "check_disk", lambda *a: None)
    refused(capsys, world, ["gptq", world / "model", "-o", world / "out", "--dataset", world / "calib.txt",
                            "--nsamples", 10 ** 9, "--batch-size", 10 ** 8, "--no-resume"],
            needles=("host memory", "is available", "--nsamples"))


def test_disk_check_message_uses_readable_units(world, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6, 999))
    result = refused(capsys, world, ["rtn", world / "model", "-o", world / "out"], needles=("disk space",))
    assert "0.00 GB" not in result.err and "999 B is free" in result.error
    assert re.search(r"the checkpoint \(\d+\.\d\d KB\)", result.error)


class _FullDisk:
    """A buffered file on a disk that fills after `budget` bytes: writes past it and the flush on
    close fail with ENOSPC, as on a real full disk."""

    def __init__(self, path: str, budget: list[int]) -> None:
        self.path, self.budget, self.pending = path, budget, False
        self.f = open(path, "wb")  # noqa: SIM115

    def write(self, data) -> int:
        import errno

        n = len(data)
        if self.budget[0] < n:
            self.pending = True
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        self.budget[0] -= n
        return self.f.write(data)

    def close(self) -> None:
        import errno

        self.f.close()
        if self.pending:
            self.pending = False
            raise OSError(errno.ENOSPC, "No space left on device", self.path)


@pytest.mark.parametrize("resume", [True, False])
def test_a_full_disk_says_so_and_leaves_nothing_half_written(world, capsys, monkeypatch, resume):
    import quantize_llm.formats.checkpoint as checkpoint

    budget = [20_000]
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r", buffering=-1: _FullDisk(str(path), budget),
                        raising=False)
    before = tree(world)
    result = run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32,
                     *([] if resume else ["--no-resume"]))
    assert_one_line_error(result, 1, "no space left on the disk of", "free some space")
    assert ("resume" in result.error) == resume
    assert not (world / "out").exists() and not list(world.glob(".out.tmp-*"))
    assert_untouched(before, world, new=[".out.resume"])


def test_no_resume_interrupt_says_nothing_was_kept(world, capsys, monkeypatch):
    import quantize_llm.run.execute as pipeline

    real = pipeline.run

    def interrupted(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield result
    monkeypatch.setattr(pipeline, "run", interrupted)
    for resume, needle in (("--no-resume", "nothing was kept"), ("--resume", "1 finished blocks are kept")):
        before = tree(world)
        result = run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32, resume)
        assert_one_line_error(result, 130, needle)
        assert_untouched(before, world, new=[".out.resume"])
        assert not list(world.glob(".out.tmp-*"))


@pytest.mark.parametrize("output", ["{home}/model", "{home}/model/sub", "{home}", "."])
def test_a_later_jobs_destructive_output_is_found_before_the_first_job_runs(world, capsys, output):
    recipe = world / "r.toml"
    recipe.write_text(f'[[jobs]]\nmodel = "{world / "model"}"\noutput = "{world / "first"}"\nmethod = "rtn"\n'
                      f'group_size = 32\n[[jobs]]\nmodel = "{world / "model"}"\noutput = "{output.format(home=world)}"\n'
                      'method = "rtn"\ngroup_size = 32\noverwrite = true\n')
    for command in (["run", recipe], ["run", recipe, "--check"], ["plan", recipe]):
        result = refused(capsys, world, command, needles=(r"jobs\[1\]", "model folder|current folder|no checkpoint"),
                         cwd=world)
        assert not (world / "first").exists(), result.err
