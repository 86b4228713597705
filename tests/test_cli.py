"""End to end through the CLI's error boundary: happy paths and every bad input of the foundation."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import dequant_f64, rtn_f64

from quantize_llm.cli.app import main


def cli(*args: str) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def fake_quantized_model(src: Path, bits: int, group_size: int, sym: bool,
                         dense: str | None = None) -> torch.nn.Module:
    """The source model with every block Linear replaced by its float64 RTN reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not (dense and re.search(dense, name)):
            w = module.weight.data
            codes, scale, zero, _ = rtn_f64(w, bits, group_size, sym, 0 if sym else 1)
            g_idx = torch.arange(w.shape[1]) // (w.shape[1] if group_size == -1 else group_size)
            module.weight.data = dequant_f64(codes, scale, zero, g_idx).float()
    return model


def fake_quantized_logits(src: Path, bits: int, group_size: int, sym: bool, ids: torch.Tensor,
                          dense: str | None = None) -> torch.Tensor:
    """Logits of `fake_quantized_model` on ids."""
    with torch.no_grad():
        return fake_quantized_model(src, bits, group_size, sym, dense)(ids).logits


ARCH_CASES = [("llama", 4, 32, True), ("llama-tied", 4, 64, False), ("mistral", 8, -1, True),
              ("qwen2", 3, 32, False), ("qwen3", 2, 32, True), ("gemma", 4, 32, False),
              ("gemma2", 4, 32, True), ("gemma3", 4, 32, True), ("phi3", 4, 64, False), ("opt", 4, 32, True)]


@pytest.mark.parametrize("arch,bits,group_size,sym", ARCH_CASES)
def test_rtn_writes_a_checkpoint_that_loads_to_the_fake_quantized_logits(tiny_model, tmp_path, arch, bits,
                                                                           group_size, sym):
    from quantize_llm import load_quantized

    src = tiny_model(arch)
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--bits", bits, "--group-size", group_size,
               "--sym" if sym else "--asym") == 0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model = load_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, fake_quantized_logits(src, bits, group_size, sym, ids), rtol=0, atol=2e-5)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig == json.loads((out / "quantize_config.json").read_text())
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"], qconfig["quant_method"]) == \
        (bits, group_size, sym, "gptq")
    assert qconfig["checkpoint_format"] == qconfig["format"] == "gptq" and qconfig["desc_act"] is False
    assert leftovers(tmp_path) == []


def test_checkpoint_layout_files_and_model_card(tiny_model, tmp_path, capsys):
    from safetensors import safe_open

    src = tiny_model("llama", max_shard_size="100KB")        # sharded input
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--bits", 4, "--group-size", 32, "--max-shard-size", "150KB") == 0
    stdout = capsys.readouterr().out
    assert "bits/weight" in stdout and "wrote" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    keys = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            keys.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(keys) == set(index["weight_map"])
    p = "model.layers.0.self_attn.q_proj"
    assert f"{p}.weight" not in keys
    assert keys[f"{p}.qweight"].shape == (64 * 4 // 32, 64) and keys[f"{p}.qweight"].dtype == torch.int32
    assert keys[f"{p}.qzeros"].shape == (2, 64 * 4 // 32) and (keys[f"{p}.qzeros"] == 0x77777777).all()
    assert keys[f"{p}.scales"].shape == (2, 64) and keys[f"{p}.scales"].dtype == torch.float16
    assert keys[f"{p}.g_idx"].tolist() == [i // 32 for i in range(64)]
    assert keys["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" in keys
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "quantize-llm rtn" in card and "group size | 32" in card and "bits per weight" in card


def test_partial_last_group(tmp_path):
    """in_features 96 with group 64: the GPTQ layout stores ceil(96/64) = 2 groups."""
    import transformers

    from quantize_llm import load_quantized

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=32)
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--group-size", 64, "--asym") == 0
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        got = load_quantized(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, fake_quantized_logits(src, 4, 64, False, ids), rtol=0, atol=2e-5)


def test_keep_dense_and_uneven_skips(tiny_model, tmp_path):
    from safetensors import safe_open

    src = tiny_model("llama")
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--keep-dense", r"mlp\.down_proj",
               "--keep-dense", r"layers\.1\.self_attn\.o_proj") == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.qweight" not in names
    assert "model.layers.1.self_attn.o_proj.weight" in names and "model.layers.0.self_attn.o_proj.qweight" in names
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert ["mlp.down_proj"] not in qconfig["modules_in_block_to_quantize"]
    assert list(qconfig["dynamic"]) == [r"-:^model\.layers\.1\.self_attn\.o_proj$"]
    assert qconfig["meta"]["spec"]["keep_dense"] == [r"mlp\.down_proj", r"layers\.1\.self_attn\.o_proj"]


def test_same_inputs_give_byte_identical_files(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    for name in ("a", "b"):
        assert cli("rtn", src, "-o", tmp_path / name, "--asym") == 0
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_inspect_reports_modules_and_bits_per_weight(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--group-size", 32) == 0
    capsys.readouterr()
    assert cli("inspect", out) == 0
    text = capsys.readouterr().out
    # 4 bits + fp16 scale/32 + 4-bit zero/32 + int32 g_idx per input over `out` rows
    linears = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "g": (128, 64), "u": (128, 64),
               "d": (64, 128)}
    bits = sum(o * i * 4 + (i // 32) * o * (16 + 4) + 32 * i for o, i in linears.values())
    params = sum(o * i for o, i in linears.values())
    assert f"bits per weight: {bits / params:.3f}" in text
    assert "self_attn.q_proj" in text and "(x2)" in text


def test_log_json_events(tiny_model, tmp_path):
    log = tmp_path / "log.jsonl"
    assert cli("rtn", tiny_model("llama"), "-o", tmp_path / "out", "--log-json", log) == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["event"] == "warning" and e["message"].startswith("vLLM: ") for e in events)   # tiny shapes
    events = [e for e in events if e["event"] != "warning"]
    assert [e["event"] for e in events] == ["start", "plan", "eta", "block", "block", "verified", "done"]
    plan, block = events[1], events[3]
    assert plan["output_bytes"] > 0 and plan["resume_bytes"] >= plan["output_bytes"] and plan["host_peak_bytes"] > 0
    assert block["index"] == 0 and "seconds" in block and block["layers"][0]["metrics"]["rel_error"] > 0
    assert events[-1]["bits_per_weight"] > 4


# ---- bad input: one line on stderr, exit code 2, nothing left behind -------------------------------

def expect_error(capsys, args, needle: str, code: int = 2) -> str:
    capsys.readouterr()
    assert cli(*args) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]   # progress lines may come before it
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert re.search(needle, err), err
    return err


def test_missing_path(capsys, tmp_path):
    expect_error(capsys, ["rtn", tmp_path / "nope", "-o", tmp_path / "out"], "no such folder: .*nope")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["rtn", tmp_path / "empty", "-o", tmp_path / "out"], "config.json")


def test_an_architecture_name_transformers_lacks_is_built_from_its_model_type(tiny_model, tmp_path):
    """Nothing is looked up in a table of allowed names: config.json's model_type builds the model
    and its blocks are found in it."""
    from quantize_llm import load_quantized

    src = tiny_model("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli("rtn", src, "-o", tmp_path / "out", "--group-size", "32") == 0
    model = load_quantized(tmp_path / "out")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"


def test_blocks_without_linear_layers_are_refused_in_one_line(capsys, tmp_path):
    """GPT-2 computes its projections with transformers' Conv1D, not torch.nn.Linear."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    expect_error(capsys, ["rtn", tmp_path / "gpt2", "-o", tmp_path / "out"],
                 "GPT2LMHeadModel has no list of decoder blocks holding Linear layers")
    assert not (tmp_path / "out").exists()


def test_pickle_only_checkpoint_is_refused(capsys, tiny_model, tmp_path):
    src = tiny_model("llama")
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out"], "safetensors")


@pytest.mark.parametrize("args,needle", [
    (["--bits", "5"], "--bits 5"), (["--group-size", "0"], "--group-size 0"),
    (["--device", "cuda:7"], "--device cuda:7 was asked for but CUDA is not available"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size")])
def test_bad_options(capsys, tiny_model, tmp_path, args, needle):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", tmp_path / "out", *args], needle)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(capsys, tiny_model, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "out"
    assert cli("rtn", src, "-o", out, "--bits", 8) == 0
    (out / "mine.txt").write_text("an earlier run's folder")
    expect_error(capsys, ["rtn", src, "-o", out], "--overwrite")
    assert (out / "mine.txt").exists()
    assert cli("rtn", src, "-o", out, "--overwrite") == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4


def test_overwrite_replaces_checkpoints_only(capsys, tiny_model, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", out, "--overwrite"], "holds no checkpoint")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


def test_unwritable_output(capsys, tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    expect_error(capsys, ["rtn", tiny_model("llama"), "-o", blocker / "out"],
                 "the parent folder .*file does not exist or is not a folder")


def test_truncated_and_corrupt_safetensors(capsys, tiny_model, tmp_path):
    src = tiny_model("llama")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out"], "model.safetensors")
    (src / "model.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out"], "header")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard,needle", [
    ("model-00009-of-00009.safetensors", "names shard model-00009-of-00009.safetensors, which is missing"),
    ("../outside.safetensors", r"names shard '\.\./outside\.safetensors' outside the checkpoint folder")])
def test_bad_index(capsys, tiny_model, tmp_path, shard, needle):
    src = tiny_model("llama", max_shard_size="100KB")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out"], needle)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weight_names_the_tensor(capsys, tiny_model, tmp_path, value):
    from safetensors.torch import load_file, save_file

    src = tiny_model("llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out"], r"model\.layers\.1\.mlp\.up_proj\.weight")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_ctrl_c_removes_the_temporary_folder(tmp_path):
    """SIGINT mid-run: exit 130, one line, no OUT and no temporary folder."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=48,
                                   num_attention_heads=4, num_key_value_heads=4)
    src = tmp_path / "src"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The child gets SIGINT's default disposition even where the test runner's ignores it (a job
    # started in the background), as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen([sys.executable, "-m", "quantize_llm", "rtn", str(src), "-o", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("block 2/"):
            break
        assert line, "".join(lines)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


# ---- what goes where: stdout, stderr and the noise of the libraries underneath ----------------------

def test_log_json_dash_leaves_stdout_to_the_json_events(tiny_model, tmp_path, calib_file, capsys):
    """With --log-json -, every stdout line parses as a JSON event and the results go to stderr."""
    src = tiny_model("llama")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[jobs]]\nmodel = "{src}"\noutput = "{tmp_path / "job"}"\nmethod = "rtn"\ngroup_size = 32\n')
    runs = [(["rtn", src, "-o", tmp_path / "rtn", "--group-size", 32], "wrote "),
            (["gptq", src, "-o", tmp_path / "gptq", "--group-size", 32, "--dataset", calib_file, "--nsamples", 4,
              "--seqlen", 32], "wrote "),
            (["convert", tmp_path / "rtn", "-o", tmp_path / "ct", "--format", "compressed-tensors"], "converted "),
            (["eval", tmp_path / "rtn", "--dataset", calib_file, "--seqlen", 64, "--windows", 2, "--baseline", src],
             "KL to baseline"),
            (["run", recipe, "--check"], "1 job(s)"),
            (["run", recipe], "wrote ")]
    for args, result in runs:
        capsys.readouterr()
        assert cli(*args, "--log-json", "-") == 0, args
        captured = capsys.readouterr()
        events = [json.loads(line) for line in captured.out.splitlines()]
        assert all(isinstance(e, dict) and "event" in e for e in events), args
        assert (events == []) == (args[-1] == "--check"), args              # --check runs nothing
        assert result in captured.err, args


def test_the_noise_of_transformers_stays_out_of_our_progress_output(tiny_model, tmp_path):
    """A run that loads the model with transformers and writes its own calibration text with it: its
    stderr holds our lines only, no weight-loading bar, log line or deprecation warning of transformers."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "quantize_llm", "gptq", str(tiny_model("llama")), "-o",
                           str(tmp_path / "out"), "--group-size", "32", "--nsamples", "2", "--seqlen", "16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for noise in ("Loading weights", "past_key_values", "Warning:", "[transformers]", "it/s]"):
        assert noise not in proc.stderr, noise
    assert "calibration text: 32/32 tokens written" in proc.stderr


def test_quiet_transformers_restores_what_it_changed():
    import warnings

    from transformers.utils import logging as hf_logging

    from quantize_llm.cli.progress import quiet_transformers

    saved = hf_logging.get_verbosity()
    try:
        for verbosity, bars in ((hf_logging.INFO, True), (hf_logging.WARNING, False)):
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                filters = list(warnings.filters)
                with quiet_transformers():
                    assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
                    warnings.warn("an argument is deprecated", FutureWarning, stacklevel=1)
                    warnings.warn("ours", UserWarning, stacklevel=1)
                warnings.warn("after", FutureWarning, stacklevel=1)
                assert warnings.filters == filters
            assert [str(w.message) for w in seen] == ["ours", "after"]
            assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled() == bars
    finally:
        hf_logging.set_verbosity(saved)
        hf_logging.enable_progress_bar()


def test_importing_the_command_line_changes_nothing_in_transformers():
    code = ("import warnings, torch; from transformers.utils import logging as l; "   # torch adds filters of its own
            "before = (l.get_verbosity(), l.is_progress_bar_enabled(), list(warnings.filters)); "
            "import quantize_llm.cli; "
            "assert (l.get_verbosity(), l.is_progress_bar_enabled(), list(warnings.filters)) == before")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_reporter_shows_the_calibration_text_being_written():
    """calibration_text events: a line per tenth on plain stderr, a bar of its own on a terminal."""
    import io

    from quantize_llm.cli.progress import Reporter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    start = {"blocks": 2, "model": "m", "output": "o", "device": "cpu"}
    plain = io.StringIO()
    with Reporter(stderr=plain, label="gptq") as report:
        report("start", start)
        for tokens in range(0, 101, 5):
            report("calibration_text", {"tokens": tokens, "total": 100})
    lines = [line for line in plain.getvalue().splitlines() if line.startswith("calibration text")]
    assert lines == [f"calibration text: {t}/100 tokens written" for t in range(10, 101, 10)]
    with Reporter(stderr=Terminal(), label="gptq") as report:
        report("start", start)
        report("calibration_text", {"tokens": 40, "total": 100})
        bars = {task.description: task for task in report.progress.tasks}
        assert (bars["gptq"].total, bars["gptq"].fields["unit"]) == (2, "blocks")
        text = bars["calibration text"]
        assert (text.completed, text.total, text.fields["unit"]) == (40, 100, "tokens")


def test_the_same_finding_for_many_modules_is_one_line(tmp_path):
    """Per-module warnings are shown once per finding, naming the first module and counting the rest,
    when the burst ends (any other event, in order); --log-json keeps every one."""
    import io

    from quantize_llm.cli.progress import Reporter

    stderr, log = io.StringIO(), tmp_path / "log.jsonl"
    findings = [f"vLLM: model.layers.{i}.mlp.up_proj: shape [128, 64] does not tile" for i in range(3)]
    findings += ["vLLM: model.layers.0.self_attn.o_proj: in_features 64 is not a multiple of 128",
                 "vLLM: model.layers.1.mlp.up_proj: shape [128, 64] does not tile",
                 "vLLM: asymmetric GPTQ checkpoints run on vLLM's slow gptq kernel",
                 "vLLM: model.layers.1.self_attn.o_proj: in_features 64 is not a multiple of 128"]
    with Reporter(log, stderr=stderr) as report:
        report("start", {"blocks": 2, "model": "m", "output": "o", "device": "cpu"})
        for message in findings[:4]:
            report("warning", {"message": message})
        assert "warning" not in stderr.getvalue()                            # held while the burst lasts
        for message in findings[4:]:
            report("warning", {"message": message})
        report("block", {"index": 0, "blocks": 2, "seconds": 1.0, "peak_rss_mb": 10.0})
    lines = stderr.getvalue().splitlines()
    assert lines[1:6] == ["warning: vLLM: model.layers.0.mlp.up_proj and 3 more modules: shape [128, 64] does not tile",
                          "warning: vLLM: model.layers.0.self_attn.o_proj: in_features 64 is not a multiple of 128",
                          "warning: vLLM: asymmetric GPTQ checkpoints run on vLLM's slow gptq kernel",
                          "warning: vLLM: model.layers.1.self_attn.o_proj: in_features 64 is not a multiple of 128",
                          "block 1/2 done in 1.00s (peak RSS 10 MiB)"]
    assert [json.loads(line)["message"] for line in log.read_text().splitlines()[1:-1]] == findings


def test_small_linears_the_format_cannot_hold_stay_dense_and_are_listed(tmp_path, capsys):
    """k_proj and v_proj of a 1-KV-head model are 16 x 64, which the GPTQ layout cannot pack (it
    needs multiples of 32): being a small part of each block they stay dense, the plan says so, the
    config lists them as not quantized and the checkpoint loads; a block made mostly of such
    Linears is refused instead (the test below)."""
    from conftest import build_tiny
    from safetensors.torch import load_file

    from quantize_llm import load_quantized

    src = build_tiny("llama", tmp_path / "src", config={"num_key_value_heads": 1})
    assert cli("rtn", src, "-o", tmp_path / "out", "--group-size", "32") == 0
    err = capsys.readouterr().err
    assert "dense: 4 block Linears the format cannot hold, such as model.layers.0.self_attn.k_proj [16, 64]" in err
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert "model.layers.0.self_attn.k_proj.weight" in written and "model.layers.0.self_attn.q_proj.qweight" in written
    model = load_quantized(tmp_path / "out")
    assert type(model.model.layers[1].self_attn.v_proj).__name__ == "Linear"
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "QuantLinear"


def test_a_block_mostly_made_of_linears_the_format_cannot_hold_is_refused(capsys, tmp_path):
    from conftest import build_tiny

    src = build_tiny("llama", tmp_path / "src", config={"intermediate_size": 72})
    expect_error(capsys, ["rtn", src, "-o", tmp_path / "out", "--group-size", "32"],
                 r"model\.layers\.0\.mlp\.gate_proj: the gptq format cannot hold this layer.*--keep-dense")
    assert not (tmp_path / "out").exists()


def test_blocks_called_with_positional_arguments_are_calibrated(tmp_path, calib_file):
    """XGLM's decoder passes the attention mask to each block positionally; the runner replays it."""
    import transformers

    from quantize_llm import load_quantized

    cfg = transformers.XGLMConfig(vocab_size=256, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                                  max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.XGLMForCausalLM(cfg).save_pretrained(tmp_path / "xglm")
    assert cli("gptq", tmp_path / "xglm", "-o", tmp_path / "out", "--group-size", "32", "--dataset", calib_file,
               "--nsamples", "4", "--seqlen", "32") == 0
    model = load_quantized(tmp_path / "out")
    assert type(model.model.layers[0].fc1).__name__ == "QuantLinear"


def test_convert_to_gguf_on_the_command_line(tiny_model, tmp_path, capsys):
    pytest.importorskip("gguf")
    src = tiny_model("llama", config=dict(hidden_size=256, intermediate_size=512))
    assert cli("rtn", src, "-o", tmp_path / "q", "--group-size", 32, "--bits", 4) == 0
    capsys.readouterr()
    assert cli("convert", tmp_path / "q", "-o", tmp_path / "q.gguf", "--format", "gguf:Q4_K_M") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "exact GGUF type" in err[0] and "Traceback" not in "\n".join(err)
    assert cli("convert", tmp_path / "q", "-o", tmp_path / "q.gguf", "--format", "gguf") == 0
    assert "converted" in capsys.readouterr().out and (tmp_path / "q.gguf").is_file()
    assert cli("convert", tmp_path / "q", "-o", tmp_path / "q.gguf", "--format", "gguf") == 2   # no --overwrite
    assert "already exists" in capsys.readouterr().err
