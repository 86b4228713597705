"""Crash-safe resume: a run interrupted after some blocks (an exception, SIGINT, SIGTERM, SIGKILL)
and rerun gives a checkpoint byte-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny
from test_cli import cli

import quantize_llm.run.execute as pipeline

FILES = ("model.safetensors", "config.json", "quantize_config.json")


@pytest.fixture
def deep_model(tmp_path: Path) -> Path:
    """A tiny Llama with 10 blocks, so that a run can be stopped part-way."""
    return build_tiny("llama", tmp_path / "deep", config={"num_hidden_layers": 10})


def same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fail_after(monkeypatch, blocks: int) -> None:
    """Make the runner raise after `blocks` blocks have been handed to the writer."""
    real = pipeline.run

    def run(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            if i == blocks:
                raise RuntimeError("simulated crash")
            yield result
    monkeypatch.setattr(pipeline, "run", run)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_resume_after_a_crash_is_byte_identical(deep_model, tmp_path, calib_file, monkeypatch, method):
    args = [method, deep_model, "--bits", 4, "--group-size", 32]
    if method != "rtn":
        args += ["--dataset", calib_file, "--nsamples", 8, "--seqlen", 32, "--batch-size", 4]
    assert cli(*args, "-o", tmp_path / "whole") == 0
    assert not (tmp_path / ".whole.resume").exists()                    # a finished run leaves no state

    fail_after(monkeypatch, 4)
    assert cli(*args, "-o", tmp_path / "out") == 1
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
    state = tmp_path / ".out.resume"
    assert sorted(p.name for p in state.glob("block-*")) == [f"block-0000{i}.safetensors" for i in range(4)]
    assert (state / "inputs-00004.safetensors").exists() == (method != "rtn")

    log = tmp_path / "log.jsonl"
    assert cli(*args, "-o", tmp_path / "out", "--log-json", log) == 0
    resumed = [e for e in events(log) if e["event"] == "resume"]
    assert resumed and resumed[0]["from_block"] == 4
    assert [e["index"] for e in events(log) if e["event"] == "block"] == list(range(4, 10))
    same_files(tmp_path / "whole", tmp_path / "out")
    assert not state.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_changed_settings_start_over_and_say_why(deep_model, tmp_path, calib_file, monkeypatch, capsys):
    args = ["gptq", deep_model, "-o", tmp_path / "out", "--group-size", 32, "--dataset", calib_file,
            "--nsamples", 8, "--seqlen", 32]
    fail_after(monkeypatch, 3)
    assert cli(*args) == 1
    monkeypatch.undo()
    capsys.readouterr()
    log = tmp_path / "log.jsonl"
    assert cli(*args, "--damp", 0.05, "--log-json", log) == 0
    warnings = [e["message"] for e in events(log) if e["event"] == "warning"]
    assert any("starting over" in w and "options changed" in w for w in warnings), warnings
    assert not any(e["event"] == "resume" for e in events(log))
    assert cli(*args[:2], "-o", tmp_path / "ref", *args[4:], "--damp", 0.05) == 0
    same_files(tmp_path / "ref", tmp_path / "out")


def test_no_resume_discards_saved_progress(deep_model, tmp_path, monkeypatch):
    args = ["rtn", deep_model, "-o", tmp_path / "out", "--group-size", 32]
    fail_after(monkeypatch, 5)
    assert cli(*args) == 1
    monkeypatch.undo()
    log = tmp_path / "log.jsonl"
    assert cli(*args, "--no-resume", "--log-json", log) == 0
    assert any("--no-resume was given" in e.get("message", "") for e in events(log))
    assert [e["index"] for e in events(log) if e["event"] == "block"] == list(range(10))
    assert not (tmp_path / ".out.resume").exists()


def test_no_resume_keeps_no_state(deep_model, tmp_path, monkeypatch):
    fail_after(monkeypatch, 5)
    assert cli("rtn", deep_model, "-o", tmp_path / "out", "--group-size", 32, "--no-resume") == 1
    assert not (tmp_path / ".out.resume").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill", "int", "term"])
def test_killed_process_resumes_byte_identical(deep_model, tmp_path, calib_file, sig):
    """A real process stopped by a signal once block 2 is done; the rerun finishes the job."""
    args = ["gptq", str(deep_model), "--group-size", "32", "--dataset", str(calib_file), "--nsamples", "24",
            "--seqlen", "64", "--batch-size", "1"]
    assert cli(*args, "-o", tmp_path / "whole") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT's default disposition in the child even where the test runner ignores it (see test_cli).
    proc = subprocess.Popen([sys.executable, "-m", "quantize_llm", *args, "-o", str(tmp_path / "out"),
                             "--log-json", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("event") == "block" and json.loads(line)["index"] >= 2:
            proc.send_signal(sig)
            break
    proc.stdout.read()
    err = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code == (-9 if sig == signal.SIGKILL else 130), err
    if sig != signal.SIGKILL:
        assert "rerun the same command to resume" in err
        assert not list(tmp_path.glob(".out.tmp-*"))                   # the writer's temp folder is gone
    assert not (tmp_path / "out").exists()
    done = len(list((tmp_path / ".out.resume").glob("block-*.safetensors")))
    assert 3 <= done < 10
    log = tmp_path / "log.jsonl"
    assert cli(*args, "-o", tmp_path / "out", "--log-json", log) == 0
    assert [e for e in events(log) if e["event"] == "resume"][0]["from_block"] == done
    same_files(tmp_path / "whole", tmp_path / "out")
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(deep_model, tmp_path, capsys):
    import fcntl

    lock = open(tmp_path / ".out.lock", "a+")                 # what a running job holds
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        from test_cli import expect_error

        expect_error(capsys, ["rtn", deep_model, "-o", tmp_path / "out", "--group-size", 32],
                     "another run is writing .*out right now")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    finally:
        lock.close()
    assert cli("rtn", deep_model, "-o", tmp_path / "out", "--group-size", 32) == 0
    assert not (tmp_path / ".out.lock").exists()


def resave(src: Path, dest: Path) -> None:
    """Replace `dest`'s weights by `src`'s, in place (new files, same names, same headers)."""
    import shutil

    for path in src.glob("*.safetensors"):
        (dest / path.name).unlink()
        shutil.copyfile(path, dest / path.name)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_other_weights_behind_the_same_headers_are_not_resumed(tmp_path, calib_file, monkeypatch, method):
    """A second fine-tune of one base re-saved in place: same config, same headers, other weights.
    The saved blocks were computed from the first weights and must not reach the output."""
    first = build_tiny("llama", tmp_path / "model", config={"num_hidden_layers": 6}, seed=1)
    second = build_tiny("llama", tmp_path / "second", config={"num_hidden_layers": 6}, seed=2)
    args = [method, first, "--group-size", 32]
    if method == "gptq":
        args += ["--dataset", calib_file, "--nsamples", 8, "--seqlen", 32, "--batch-size", 4]
    assert cli(*args[:1], second, *args[2:], "-o", tmp_path / "want") == 0
    fail_after(monkeypatch, 3)
    assert cli(*args, "-o", tmp_path / "out") == 1
    monkeypatch.undo()
    resave(second, first)
    log = tmp_path / "log.jsonl"
    assert cli(*args, "-o", tmp_path / "out", "--log-json", log) == 0
    warnings = [e["message"] for e in events(log) if e["event"] == "warning"]
    assert any("weights changed" in w for w in warnings), warnings
    same_files(tmp_path / "want", tmp_path / "out")


def test_the_same_weights_re_saved_in_place_still_resume(tmp_path, monkeypatch):
    model = build_tiny("llama", tmp_path / "model", config={"num_hidden_layers": 6})
    copy = build_tiny("llama", tmp_path / "copy", config={"num_hidden_layers": 6})   # same seed: same bytes
    args = ["rtn", model, "--group-size", 32, "-o", tmp_path / "out"]
    assert cli("rtn", copy, "--group-size", 32, "-o", tmp_path / "want") == 0
    fail_after(monkeypatch, 3)
    assert cli(*args) == 1
    monkeypatch.undo()
    resave(copy, model)
    log = tmp_path / "log.jsonl"
    assert cli(*args, "--log-json", log) == 0
    assert [e["from_block"] for e in events(log) if e["event"] == "resume"] == [3]
    assert [e["index"] for e in events(log) if e["event"] == "block"] == [3, 4, 5]
    same_files(tmp_path / "want", tmp_path / "out")


def test_another_model_folder_does_not_resume(tmp_path, monkeypatch):
    first = build_tiny("llama", tmp_path / "first", config={"num_hidden_layers": 6})
    second = build_tiny("llama", tmp_path / "second", config={"num_hidden_layers": 6})   # identical bytes
    fail_after(monkeypatch, 3)
    assert cli("rtn", first, "--group-size", 32, "-o", tmp_path / "out") == 1
    monkeypatch.undo()
    log = tmp_path / "log.jsonl"
    assert cli("rtn", second, "--group-size", 32, "-o", tmp_path / "out", "--log-json", log) == 0
    assert any("model changed" in e.get("message", "") for e in events(log))
    assert not any(e["event"] == "resume" for e in events(log))


@pytest.mark.parametrize("damage", ["truncate", "flip", "metadata"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_damaged_saved_block_is_dropped_and_computed_again(deep_model, tmp_path, calib_file, monkeypatch,
                                                             damage, method):
    args = [method, deep_model, "--group-size", 32]
    if method == "gptq":
        args += ["--dataset", calib_file, "--nsamples", 8, "--seqlen", 32, "--batch-size", 4]
    assert cli(*args, "-o", tmp_path / "whole") == 0
    fail_after(monkeypatch, 5)
    assert cli(*args, "-o", tmp_path / "out") == 1
    monkeypatch.undo()
    block = tmp_path / ".out.resume" / "block-00003.safetensors"
    data = bytearray(block.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-5] ^= 0xFF
    else:
        data[10:20] = b"x" * 10
    block.write_bytes(bytes(data))
    log = tmp_path / "log.jsonl"
    assert cli(*args, "-o", tmp_path / "out", "--log-json", log) == 0
    warnings = [e["message"] for e in events(log) if e["event"] == "warning"]
    assert any("saved block 3" in w and "damaged" in w for w in warnings), warnings
    computed = [e["index"] for e in events(log) if e["event"] == "block"]
    # rtn continues at the damaged block; gptq has no inputs saved for it and starts over
    assert computed == (list(range(3, 10)) if method == "rtn" else list(range(10)))
    same_files(tmp_path / "whole", tmp_path / "out")


def test_bad_input_found_part_way_leaves_no_state(tmp_path, capsys):
    """NaN weights in block 2: the rerun would fail the same way, so nothing is kept for it."""
    from safetensors.torch import load_file, save_file

    model = build_tiny("llama", tmp_path / "model", config={"num_hidden_layers": 4})
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert cli("rtn", model, "--group-size", 32, "-o", tmp_path / "out") == 2
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / ".out.resume").exists() and not (tmp_path / "out").exists()


def test_the_lock_follows_a_replaced_lock_file(tmp_path, monkeypatch):
    """Between open and flock another process may remove the file (a finishing run unlinks it):
    the lock must end up on the file that is at the path, or a third run could lock a fresh one."""
    import fcntl

    from quantize_llm.run.resume import OutputLock

    real, replaced = fcntl.flock, []

    def flock(fd, op):
        if not replaced:
            replaced.append(True)
            path = tmp_path / ".out.lock"
            path.unlink()
            path.write_text("")
        return real(fd, op)
    monkeypatch.setattr(fcntl, "flock", flock)
    lock = OutputLock(tmp_path / "out")
    lock.acquire()
    try:
        assert os.fstat(lock._fd).st_ino == os.stat(tmp_path / ".out.lock").st_ino
        assert json.loads((tmp_path / ".out.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / ".out.lock").exists()


def test_a_filesystem_without_locks_is_said(tmp_path, monkeypatch):
    import errno
    import fcntl

    from quantize_llm.run.resume import OutputLock

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", flock)
    said = []
    with OutputLock(tmp_path / "out", emit=lambda kind, data: said.append((kind, data["message"]))):
        pass
    assert said and said[0][0] == "warning" and "would not be noticed" in said[0][1]
