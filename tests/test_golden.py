"""The bytes of a fixed set of runs, pinned: restructuring the code must not change a checkpoint.

Each run writes a tiny checkpoint through the command line; the SHA-256 of its weight files and of
its config files (minus the one absolute path they record) must equal the value recorded when the
set was made. A change that alters a checkpoint on purpose updates the value here, in its own
commit, saying why.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import CALIB_TEXT, build_tiny
from test_cli import cli

CAL = ["--dataset", "{calib}", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]

RUNS: dict[str, list[str]] = {
    "rtn-sym": ["rtn", "{llama}", "--group-size", "32"],
    "rtn-asym-3bit": ["rtn", "{qwen2}", "--bits", "3", "--group-size", "32", "--asym"],
    "rtn-ct": ["rtn", "{llama}", "--group-size", "32", "--format", "compressed-tensors", "--asym"],
    "rtn-awq-format": ["rtn", "{llama}", "--group-size", "32", "--format", "awq", "--asym"],
    "rtn-mse-channel": ["rtn", "{opt}", "--group-size", "-1", "--clip", "mse"],
    "gptq": ["gptq", "{llama}", "--group-size", "32", "--asym", *CAL],
    "gptq-actorder": ["gptq", "{qwen2}", "--group-size", "32", "--act-order", *CAL],
    "gptq-static-minmax": ["gptq", "{llama}", "--group-size", "32", "--act-order", "--static-groups",
                           "--clip", "minmax", "--no-true-sequential", *CAL],
    "awq": ["awq", "{llama}", "--group-size", "32", *CAL],
    "awq-then-gptq-phi3": ["awq", "{phi3}", "--group-size", "32", "--then", "gptq", *CAL],
    "nf4": ["nf4", "{llama}"],
    "nf4-gptq": ["nf4", "{llama}", "--rounding", "gptq", *CAL],
    "outlier-weight": ["outlier", "{llama}", "--group-size", "32", "--outlier-fraction", "0.01"],
    "outlier-gptq-channel": ["outlier", "{llama}", "--group-size", "32", "--inner", "gptq", "--mode", "channel",
                             "--outlier-fraction", "0.05", *CAL],
}

RECIPE = """[[jobs]]
model = "{llama}"
output = "{out}"
method = "gptq"
group_size = 32
keep_dense = ['^model\\.layers\\.0\\.mlp\\.down_proj$']
[jobs.calibration]
dataset = "{calib}"
nsamples = 8
seqlen = 32
[[jobs.overrides]]
match = 'mlp\\.up_proj$'
bits = 8
[[jobs.overrides]]
match = '^lm_head$'
bits = 8
"""

# Recorded on the code of issue 14's end (the layout before the restructuring).
GOLDEN: dict[str, str] = {
    "awq": "0852b50708393a4221c29af7a8cc10c229b30e32c2847234556474e2249abe10",
    "awq-then-gptq-phi3": "fecc35134685212308f2e730019807158beb8c60e436330c5a2b51dbef46b7fa",
    "gptq": "cf97b827b36ddf9ead6c23a3a736d6a6b378e1c1a4951b9d5754796b8127c4b7",
    "gptq-actorder": "5e659492614b1ab0d525deedf8ff12edea2148471e00b2c96907da9bc3c5ae2a",
    "gptq-static-minmax": "78ab62769b631a56c05e9246519fb6f2cd04175a234ef6a91d8957c0a1d50b1e",
    "nf4": "02bacde05cb2536a52377bf7eb8e68bd9385cca9c369755520bbd0d6b04eac2f",
    "nf4-gptq": "85ad017cfa68cdfe807ae08a2fa763b719c0f2a99ef664c102b85dfbdc73bdbd",
    "outlier-gptq-channel": "5b43dd6802fb6ebbf1ac789bb6742807b9c37fc3edec0b2648a65bbdcac5d4a8",
    "outlier-weight": "d8986aa449534cb45152b08af9439ab3c8e0d5bdb03ba60d696b87ff343316c1",
    "rtn-asym-3bit": "d1f939ac28dd36965c9112fc0753f2d050ed8e4089ee42bbe00494ccc95bfd55",
    "rtn-awq-format": "ca0937bee35d4bca015c51354db224362851e4f69f1e382a795e271b6a3af72d",
    "rtn-ct": "d55a386789e7f345bf162555fdabb90869247c0bbe527a5d8408e137a69a5794",
    "rtn-mse-channel": "cf6d9630b104923dc0e6364885a2543195902c70352198eadd4061e9a7983943",
    "rtn-sym": "142ee708228da2bbae20cad1c425be336645a746fd0bc40fa275b447c7fec157",
    "recipe-overrides-head-dense": "bbd9fce39cde77e56774a93324f372ec8c6af2c2f4fe8a76381302ba1836117c",
    "convert-gptq-to-ct": "9c13e457d5df036a85d60822254ae54e0f7cf6c7ad02cc97ae22dd63635f1f9f",
}


def digest(folder: Path) -> str:
    """SHA-256 over the checkpoint's files in name order (the model card excluded: it holds the
    command line); config files without the calibration file's absolute path."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "README.md":
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            obj = json.loads(data)
            for config in (obj, obj.get("quantization_config") or {}):
                ((config.get("meta") or {}).get("calibration") or {}).pop("path", None)
            data = json.dumps(obj, sort_keys=True).encode()
        h.update(path.name.encode() + b"\0" + data)
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("golden")
    calib = root / "calib.txt"
    calib.write_text(CALIB_TEXT)
    found = {"calib": str(calib)}
    for arch in ("llama", "qwen2", "opt", "phi3"):
        found[arch] = str(build_tiny(arch, root / arch))
    return found


def test_a_recipe_with_overrides_a_quantized_head_and_a_dense_module(models: dict[str, str], tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(out=tmp_path / "out", **models))
    assert cli("run", recipe) == 0
    assert digest(tmp_path / "out") == GOLDEN["recipe-overrides-head-dense"]


def test_convert(models: dict[str, str], tmp_path: Path) -> None:
    assert cli(*[a.format(**models) for a in RUNS["gptq"]], "-o", tmp_path / "q") == 0
    assert cli("convert", tmp_path / "q", "-o", tmp_path / "out", "--format", "compressed-tensors") == 0
    assert digest(tmp_path / "out") == GOLDEN["convert-gptq-to-ct"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_checkpoint_bytes_are_pinned(name: str, models: dict[str, str], tmp_path: Path) -> None:
    args = [a.format(**models) for a in RUNS[name]]
    assert cli(*args, "-o", tmp_path / "out") == 0
    assert digest(tmp_path / "out") == GOLDEN[name]
