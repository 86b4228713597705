"""Writing a GGUF file (`--format gguf[:TYPE]`): one file that llama.cpp runs.

OUT names the file; `.gguf` is appended when OUT does not end in it. The file is written under a
temporary name beside it (`.NAME.tmp-PID`) and renamed into place once complete; an existing OUT
is refused without --overwrite. Round-to-nearest (`rtn`) reproduces llama.cpp's own reference
quantizer for every block type (core/ggml.py). Container rules: formats/gguf.py.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.spec import QuantSpec
from ..errors import OutputError, SpecError
from ..formats import gguf as gf
from ..models.load import CheckpointReader, resolve_model
from .summary import Summary

EventHandler = Callable[[str, dict], None]


def gguf_output(output: str | Path) -> Path:
    path = Path(output).expanduser()
    return path if path.name.endswith(".gguf") else path.with_name(path.name + ".gguf")


def check_method(spec: QuantSpec) -> None:
    """GGUF files are written by round-to-nearest so far."""
    if spec.method != "rtn":
        raise SpecError(f"GGUF output is written by rtn so far, not {spec.method}",
                        "quantize with `quantize-llm rtn ... --format gguf`")


def export_gguf(model: str, output: str | Path, spec: QuantSpec, scheme: str, *, overwrite: bool = False,
                on_event: EventHandler | None = None, trust_remote_code: bool = False) -> Summary:
    """Quantize MODEL into one GGUF file of `scheme` (formats/gguf.SCHEMES)."""
    import gguf

    emit = on_event or (lambda kind, data: None)
    check_method(spec)
    start = time.perf_counter()
    out = Path(os.path.abspath(gguf_output(output)))
    if out.is_dir():
        raise OutputError(f"{out} is a folder; a GGUF output is one file", "choose another -o")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", "pass --overwrite to replace it, or choose another -o")
    if not out.parent.is_dir():
        raise OutputError(f"the folder {out.parent} does not exist", "create it first, or choose another -o")
    folder = resolve_model(model, trust_remote_code=trust_remote_code)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with CheckpointReader(folder) as reader:
        config = dict(reader.config)
        arch, _ = gf.family(config)
        plans = gf.plan_tensors(config, {n: tuple(reader.shape(n)) for n in reader.names()}, scheme, spec.keep_dense)
        emit("start", {"model": model, "output": str(out), "blocks": int(config["num_hidden_layers"]),
                       "spec": spec.to_dict(), "device": "cpu", "input_bytes": reader.total_bytes})
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
        q_params = q_bytes = 0
        counts: dict[str, int] = {}
        try:
            gf.write_metadata(writer, arch, config, scheme, folder.name)
            gf.write_tokenizer(writer, folder, config)
            for plan in plans:
                w = reader.read(plan.source, check_finite=True).float().numpy()
                if plan.permute_heads:
                    w = gf.permute_rows(w, plan.permute_heads)
                array, raw = gf.encode_tensor(plan, w)
                writer.add_tensor(plan.name, array, raw_dtype=raw)
                counts[plan.type] = counts.get(plan.type, 0) + 1
                if raw is not None:
                    q_params += int(np.prod(plan.shape))
                    q_bytes += array.nbytes
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        input_bytes = reader.total_bytes
    seconds = time.perf_counter() - start
    summary = Summary(model=model, output=str(out), spec={**spec.to_dict(), "format": f"gguf:{scheme}"},
                      blocks=int(config["num_hidden_layers"]), seconds=seconds, input_bytes=input_bytes,
                      output_bytes=out.stat().st_size, quantized_params=q_params, quantized_bytes=q_bytes,
                      bits_per_weight=8 * q_bytes / max(q_params, 1), peak_rss_mb=0.0,
                      timings={"quantize and write": seconds})
    emit("done", {k: v for k, v in summary.to_dict().items() if k != "layers"})
    return summary


def tensor_types(path: Path | str) -> dict[str, Any]:
    """GGUF name -> ggml type name of every tensor in a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
