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

# Recorded on the code of issue 14's end (the layout before the restructuring), re-recorded with the
# same code when the tiny models' weights stopped depending on transformers' initialisation.
GOLDEN: dict[str, str] = {
    "awq": "190d997494e99e9980ebc8d7c2822ca74853f9eb11a965a817fddfda7c4839d9",
    "awq-then-gptq-phi3": "b68b3b5aaa7aa67b8f9937b03ef16a3a9f46286c47ba04158db118f01bfbe087",
    "gptq": "1d6a04fc1e8a56327db024dc07340a8c79107b0d95bfbdb8daaa33e8923e303e",
    "gptq-actorder": "7a4fe4f5712a928cf324af69f2deed53eb5a19947d561745b26602e60bdfd23f",
    "gptq-static-minmax": "a40ba81426db09531f67f2f3a12567e6ea65c6366ccff76ad19297c22d57343e",
    "nf4": "022cd303f4c439ce80d8e851c32a99f59f45c2fe8d97466ff38f38cf492cf0da",
    "nf4-gptq": "4380fb70817b4b279900acdf8474794cea9b414d788e79e7ecdfe1fea49459d6",
    "outlier-gptq-channel": "c3a39a7c3f6f88868a19881e3e2589cc1bbf575e5898afa614b6e8dd7c1239b8",
    "outlier-weight": "9f3baaf7041d4d08e52bbe12d934d7773e0ce44ab87ff6ef087a722eec56a395",
    "rtn-asym-3bit": "e9ab5d553b4ce49ad1026f3b2ac7786c63f11d499b92638d9e34be049a8173da",
    "rtn-awq-format": "5d860b1d293ed098d6c9e7d7b5d87092b0d91279411602bdd994be07622baaf3",
    "rtn-ct": "0401fd0bb2ea48de2d40366e39e258463c94653de838a0daa5645dfddd819b56",
    "rtn-mse-channel": "e492e427a0edf56722de3d0e1773a8f434003c5936992bb7c4b24314d76b58fe",
    "rtn-sym": "7be48b2d120985bf1c9ad486ee03aa76b2dbe7420ac2e20ee76a4d00f1c79c03",
    "recipe-overrides-head-dense": "d04ae5991425ae15bf86c1ad78e45b0cf4ba44759808002c200a60ad27f16596",
    "convert-gptq-to-ct": "a07394b3fb14afe6ceb0ab705a98846adfd51971aed62b6e0e7f770818bd9e0f",
}


def digest(folder: Path) -> str:
    """SHA-256 over the checkpoint's files in name order (the model card excluded: it holds the
    command line); config files without the calibration file's absolute path and the version of
    transformers that wrote them."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "README.md":
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            obj = json.loads(data)
            for config in (obj, obj.get("quantization_config") or {}):
                ((config.get("meta") or {}).get("calibration") or {}).pop("path", None)
            obj.pop("transformers_version", None)   # the installed library's, not the checkpoint's
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
        found[arch] = str(build_tiny(arch, root / arch, stable=True))
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
