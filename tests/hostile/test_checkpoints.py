"""Checkpoints that do not match their config, and damaged or foreign quantized checkpoints.

Each case copies a real checkpoint (the tiny Llama, or what `quantize-llm` wrote from it) into the
user's world, breaks one thing in its config.json or safetensors, and runs a command on it: the
command must refuse with one line naming what is wrong, exit 2, and leave everything as it was.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile_harness import assert_untouched, half_written, refused, run_cli, tree
from safetensors.torch import load_file, save_file

from quantize_llm.cli.app import main

Q = "model.layers.0.self_attn.q_proj"
DAMAGED = r"checkpoint damaged: model\.layers\.\d\.[a-z_.]+: "
MISMATCH = r"does not match its config\.json"
# What `quantize-llm` writes from the tiny Llama, one folder per layout.
SOURCES = {
    "gptq": ["rtn", "--group-size", "32"],
    "nf4": ["nf4"],
    "awq": ["rtn", "--group-size", "32", "--asym", "--format", "awq"],
    "ct": ["rtn", "--group-size", "32", "--format", "compressed-tensors"],
    "outlier": ["outlier", "--group-size", "32", "--outlier-fraction", "0.02"],
}


@pytest.fixture(scope="module")
def written(_tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("written")
    folders = {"model": _tiny_llama}
    for name, (command, *options) in SOURCES.items():
        try:
            main([command, str(_tiny_llama), "-o", str(root / name), *options])
        except SystemExit as exc:
            assert exc.code in (0, None), f"quantize-llm {command} failed for {name}"
        folders[name] = root / name
    return folders


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def edit_qconfig(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return edit_config(lambda config: change(config["quantization_config"]))


def edit_tensors(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


def put(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Replace tensor `name` by make(tensor)."""
    return edit_tensors(lambda t: t.update({name: make(t[name])}))


def drop(name: str) -> Callable[[Path], None]:
    return edit_tensors(lambda t: t.pop(name))


def poke(name: str, index: tuple, value: float) -> Callable[[Path], None]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t
    return put(name, change)


def copy_module(old: str, new: str) -> Callable[[Path], None]:
    """Store module `old`'s tensors a second time under the name `new`."""
    return edit_tensors(lambda t: t.update({k.replace(old, new): t[k].clone() for k in list(t) if k.startswith(old)}))


def ct_weights(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return edit_qconfig(lambda q: change(q["config_groups"]["group_0"]["weights"]))


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def bad_index(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))


def pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def args_for(command: str, folder: Path, world: Path) -> list[object]:
    out = world / "out"
    return {
        "rtn": ["rtn", folder, "-o", out, "--group-size", "32"],
        # a NaN in a source tensor is found when its block is read, once the resume folder exists;
        # --no-resume keeps the case to the refusal itself
        "rtn-no-resume": ["rtn", folder, "-o", out, "--group-size", "32", "--no-resume"],
        "eval": ["eval", folder, "--dataset", world / "calib.txt", "--seqlen", "32", "--windows", "1"],
        "generate": ["generate", folder, "hello", "--max-new-tokens", "2"],
        "inspect": ["inspect", folder],
        "convert": ["convert", folder, "-o", out, "--format", "gptq"],
        "convert-ct": ["convert", folder, "-o", out, "--format", "compressed-tensors"],
        "convert-bnb": ["convert", folder, "-o", out, "--format", "bnb"],
        "convert-outlier": ["convert", folder, "-o", out, "--format", "outlier"],
    }[command]


WIDE = edit_config(lambda c: c.update(hidden_size=256))
INT_WEIGHT = put(f"{Q}.weight", lambda w: (w * 100).to(torch.int32))
NO_QCONFIG = edit_config(lambda c: c.pop("quantization_config"))
NO_QCONFIG_NEEDLES = ("no quantization_config", r"q_proj\.qweight")

CASES = [
    # item 7: the source checkpoint against its config.json
    ("wider-config-rtn", "model", "rtn", WIDE, (MISMATCH, r"expects floating \[256, 256\]", r"and 20 other")),
    ("wider-config-eval", "model", "eval", WIDE, (MISMATCH, r"\[256, 64\]")),
    ("wider-config-generate", "model", "generate", WIDE, (MISMATCH, r"\[256, 64\]")),
    ("integer-weight-rtn", "model", "rtn", INT_WEIGHT, (MISMATCH, rf"{Q}\.weight is int32", "expects floating")),
    ("integer-weight-eval", "model", "eval", INT_WEIGHT, (MISMATCH, rf"{Q}\.weight is int32")),
    ("1d-weight-rtn", "model", "rtn", put(f"{Q}.weight", lambda w: w.reshape(-1)),
     (MISMATCH, r"\[4096\]", r"expects floating \[64, 64\]")),
    ("layers-two-rtn", "model", "rtn", edit_config(lambda c: c.update(num_hidden_layers="two")),
     ("config.json does not describe a model", "num_hidden_layers")),
    ("layers-two-eval", "model", "eval", edit_config(lambda c: c.update(num_hidden_layers="two")),
     ("config.json does not describe a model", "num_hidden_layers")),
    ("negative-hidden-rtn", "model", "rtn", edit_config(lambda c: c.update(hidden_size=-64)),
     ("config.json does not describe a model", "negative")),
    ("missing-norm-rtn", "model", "rtn", drop("model.norm.weight"), (MISMATCH, r"model\.norm\.weight.*missing")),
    ("missing-head-generate", "model", "generate", drop("lm_head.weight"), (MISMATCH, r"lm_head\.weight.*missing")),
    ("unexpected-tensor-rtn", "model", "rtn", edit_tensors(lambda t: t.update(extra=torch.zeros(3))),
     (MISMATCH, "tensor extra is in the checkpoint")),
    ("quantized-wider-config-generate", "gptq", "generate", WIDE, (MISMATCH, r"\[256, 64\]")),
    ("quantized-narrower-mlp-generate", "gptq", "generate", edit_config(lambda c: c.update(intermediate_size=96)),
     (DAMAGED, r"hold a \[128, 64\] weight, but config\.json describes a \[96, 64\] Linear")),
    ("quantized-narrower-mlp-convert", "awq", "convert", edit_config(lambda c: c.update(intermediate_size=96)),
     (DAMAGED, r"config\.json describes a \[(96, 64|64, 96)\] Linear")),
    # item 9: a quantized folder whose quantization_config was removed
    ("no-qconfig-eval", "gptq", "eval", NO_QCONFIG, NO_QCONFIG_NEEDLES),
    ("no-qconfig-generate", "gptq", "generate", NO_QCONFIG, NO_QCONFIG_NEEDLES),
    ("no-qconfig-rtn", "gptq", "rtn", NO_QCONFIG, NO_QCONFIG_NEEDLES),
    # item 8: damaged GPTQ checkpoints
    ("bits5-convert", "gptq", "convert-ct", edit_qconfig(lambda q: q.update(bits=5)), (DAMAGED, "bits 5")),
    ("bits3-convert", "gptq", "convert-ct", edit_qconfig(lambda q: q.update(bits=3)), (DAMAGED, "3-bit")),
    ("qconfig-string-convert", "gptq", "convert-ct", edit_config(lambda c: c.update(quantization_config="gptq")),
     ("checkpoint damaged: config.json: quantization_config is str",)),
    ("qweight-shape-convert", "gptq", "convert-ct", put(f"{Q}.qweight", lambda t: t[:4].clone()),
     (DAMAGED, "shape")),
    ("qweight-float-convert", "gptq", "convert-ct", put(f"{Q}.qweight", lambda t: t.float()),
     (DAMAGED, "qweight is float32", "int32")),
    ("qzeros-missing-convert", "gptq", "convert-ct", drop(f"{Q}.qzeros"), (DAMAGED, rf"{Q}\.qzeros is missing")),
    ("g-idx-range-convert", "gptq", "convert-ct", poke(f"{Q}.g_idx", (0,), 7), (DAMAGED, "g_idx holds group 7")),
    ("group-size-0-convert", "gptq", "convert-ct", edit_qconfig(lambda q: q.update(group_size=0)),
     (DAMAGED, "group_size is 0")),
    ("nan-scale-convert", "gptq", "convert-ct", poke(f"{Q}.scales", (0, 0), float("nan")),
     (DAMAGED, "scales holds 1 NaN")),
    ("bits5-generate", "gptq", "generate", edit_qconfig(lambda q: q.update(bits=5)), (DAMAGED, "bits 5")),
    ("qzeros-missing-generate", "gptq", "generate", drop(f"{Q}.qzeros"), (DAMAGED, r"qzeros is missing")),
    ("group-size-0-generate", "gptq", "generate", edit_qconfig(lambda q: q.update(group_size=0)),
     (DAMAGED, "group_size is 0")),
    ("nan-scale-eval", "gptq", "eval", poke(f"{Q}.scales", (1, 3), float("inf")), (DAMAGED, "1 Inf")),
    ("qconfig-list-eval", "gptq", "eval", edit_config(lambda c: c.update(quantization_config=[1])),
     ("checkpoint damaged: config.json: quantization_config is list",)),
    ("qconfig-string-rtn", "gptq", "rtn", edit_config(lambda c: c.update(quantization_config="gptq")),
     ("already quantized",)),
    ("quantized-layers-two-generate", "gptq", "generate", edit_config(lambda c: c.update(num_hidden_layers="two")),
     ("config.json does not describe a model", "num_hidden_layers")),
    ("qconfig-string-inspect", "gptq", "inspect", edit_config(lambda c: c.update(quantization_config="gptq")),
     ("checkpoint damaged: config.json",)),
    ("group-size-0-inspect", "gptq", "inspect", edit_qconfig(lambda q: q.update(group_size=0)),
     (DAMAGED, "group_size is 0")),
    ("qweight-shape-inspect", "gptq", "inspect", put(f"{Q}.qweight", lambda t: t[:4].clone()), (DAMAGED, "shape")),
    ("sym-string-convert", "gptq", "convert-ct", edit_qconfig(lambda q: q.update(sym="yes")),
     (DAMAGED, "sym is 'yes'")),
    ("dynamic-list-generate", "gptq", "generate", edit_qconfig(lambda q: q.update(dynamic=["q_proj"])),
     (DAMAGED, "dynamic is list")),
    ("marker-lost-generate", "gptq", "generate", drop(f"{Q}.qweight"),
     (DAMAGED, r"stores (g_idx|qzeros|scales) but not its qweight")),
    ("foreign-module-generate", "gptq", "generate", copy_module(Q, "model.layers.7.self_attn.q_proj"),
     ("checkpoint damaged: model.layers.7.self_attn.q_proj:", "no Linear")),
    ("unknown-method-convert", "gptq", "convert-ct", edit_qconfig(lambda q: q.update(quant_method="exl2")),
     ("quant_method 'exl2'",)),
    # item 8: the other layouts
    ("nf4-nan-absmax-generate", "nf4", "generate", poke(f"{Q}.weight.nested_absmax", (0,), float("nan")),
     (DAMAGED, "nested_absmax holds 1 NaN")),
    ("nf4-blob-garbage-inspect", "nf4", "inspect",
     put(f"{Q}.weight.quant_state.bitsandbytes__nf4", lambda t: torch.full_like(t, 0xFF)),
     (DAMAGED, "does not hold a JSON object")),
    ("nf4-short-weight-convert", "nf4", "convert-bnb", put(f"{Q}.weight", lambda t: t[:-1].clone()),
     (DAMAGED, "bytes cannot hold")),
    ("awq-bits3-convert", "awq", "convert", edit_qconfig(lambda q: q.update(bits=3)), (DAMAGED, "bits 3")),
    ("awq-qzeros-shape-generate", "awq", "generate", put(f"{Q}.qzeros", lambda t: t[:1].clone()),
     (DAMAGED, r"qzeros has shape \[1, 8\], expected \[2, 8\]")),
    ("ct-bits3-convert", "ct", "convert", ct_weights(lambda w: w.update(num_bits=3)), (DAMAGED, "num_bits 3")),
    ("ct-weight-shape-inspect", "ct", "inspect", put(f"{Q}.weight_shape", lambda t: torch.tensor([64, 128])),
     (DAMAGED, "weight_packed has shape")),
    ("ct-nan-scale-generate", "ct", "generate", poke(f"{Q}.weight_scale", (2, 1), float("nan")),
     (DAMAGED, "weight_scale holds 1 NaN")),
    ("outlier-column-range-generate", "outlier", "generate", poke(f"{Q}.outlier_col_idx", (0,), 999),
     (DAMAGED, "outside")),
    ("outlier-nan-value-convert", "outlier", "convert-outlier", poke(f"{Q}.outlier_values", (0,), float("nan")),
     (DAMAGED, "outlier_values holds 1 NaN")),
    # refusals that already held, kept so they stay holding
    ("truncated-rtn", "model", "rtn", truncate, ("truncated",)),
    ("truncated-generate", "gptq", "generate", truncate, ("truncated",)),
    ("bad-index-rtn", "model", "rtn", bad_index, ("missing",)),
    ("nan-source-rtn", "model", "rtn-no-resume", poke(f"{Q}.weight", (0, 0), float("nan")), (rf"{Q}\.weight", "NaN")),
    ("pickle-only-rtn", "model", "rtn", pickle_only, ("pickle",)),
    ("pickle-only-eval", "model", "eval", pickle_only, ("pickle",)),
    ("config-not-json-rtn", "model", "rtn", lambda f: (f / "config.json").write_text("{"), ("not valid JSON",)),
    ("not-quantized-convert", "model", "convert", lambda f: None, ("not quantized",)),
    ("not-quantized-inspect", "model", "inspect", lambda f: None, ("not a quantized checkpoint",)),
]


@pytest.mark.parametrize("source,command,damage,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused(world, capsys, written, source, command, damage, needles):
    folder = world / "ckpt"
    shutil.copytree(written[source], folder)
    damage(folder)
    refused(capsys, world, args_for(command, folder, world), needles=needles)


@pytest.mark.parametrize("source,command", [("model", "rtn"), ("gptq", "generate"), ("gptq", "inspect"),
                                            ("nf4", "generate"), ("awq", "convert"), ("ct", "generate"),
                                            ("outlier", "convert-outlier")])
def test_the_undamaged_checkpoints_pass(world, capsys, written, source, command):
    """The same commands on the checkpoints as written: what the cases above refuse is the damage."""
    folder = world / "ckpt"
    shutil.copytree(written[source], folder)
    before = tree(world)
    result = run_cli(capsys, *args_for(command, folder, world))
    assert result.code == 0, result.err
    assert_untouched(before, world, new=["out"])
    assert half_written(world) == []


def test_an_fp4_checkpoint_converts_to_bnb_with_every_module(world, capsys, _tiny_llama):
    """A foreign marker: fp4 modules are found by their own quant_state tensor, not nf4's."""
    for args in (["nf4", _tiny_llama, "-o", world / "fp4", "--quant-type", "fp4"],
                 ["convert", world / "fp4", "-o", world / "again", "--format", "bnb"]):
        result = run_cli(capsys, *args)
        assert result.code == 0, result.err
    source = load_file(world / "fp4" / "model.safetensors")
    again = load_file(world / "again" / "model.safetensors")
    assert sum(n.endswith("quant_state.bitsandbytes__fp4") for n in source) == 14
    assert again.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(again[name], tensor), name


@pytest.mark.parametrize("command", [["inspect"], ["convert", "-o", "{home}/c", "--format", "gptq"],
                                     ["generate", "hi", "--max-new-tokens", "2"]])
def test_a_config_naming_another_format_than_the_tensors(world, capsys, command):
    """compressed-tensors tensors under an awq quantization_config: no awq module anywhere."""
    import json

    from hostile_harness import refused, run_cli

    q = world / "q"
    assert run_cli(capsys, "rtn", world / "model", "-o", q, "--group-size", 32, "--format",
                   "compressed-tensors").code == 0
    config = json.loads((q / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                     "version": "gemm"}
    (q / "config.json").write_text(json.dumps(config))
    args = [c.format(home=world) for c in command]
    refused(capsys, world, [args[0], q, *args[1:]], needles=("checkpoint damaged", "no awq module|no tensor"))
