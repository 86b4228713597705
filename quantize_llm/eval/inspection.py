"""Describe a quantized checkpoint from its headers (and bnb's small JSON blobs): modules, sizes, real
bits per weight. Every module's headers are checked against each other and the quantization_config;
the values (NaN scales, g_idx range) are checked where they are read: convert, eval, generate."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..formats.reading import QuantizedModules
from ..models.load import CheckpointReader, resolve_model


@dataclass
class ModuleInfo:
    name: str
    bits: int
    group_size: int
    sym: bool
    shape: tuple[int, int]        # (out_features, in_features)
    nbytes: int                   # packed codes + scales + zeros + g_idx, or codes + absmax (bias excluded)
    codebook: str = "int"         # nf4/fp4: group_size is the absmax block size


@dataclass
class CheckpointInfo:
    path: str
    quant_method: str
    modules: list[ModuleInfo] = field(default_factory=list)
    total_bytes: int = 0          # every tensor in the checkpoint
    quantized_bytes: int = 0
    quantized_params: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight, scales, zeros and g_idx included."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)


def allocation_lines(info: CheckpointInfo) -> list[str]:
    """Where modules have settings of their own (a --target-bpw allocation): stored bits per weight
    per kind of module and per block; [] when every module has one setting."""
    import re
    from collections import defaultdict

    if len({(m.bits, m.group_size, m.sym, m.codebook) for m in info.modules}) < 2:
        return []
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    blocks: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m in info.modules:
        block = re.search(r"\.(\d+)\.", m.name)
        for table, key in ((kinds, m.name.rsplit(".", 1)[-1]), (blocks, block.group(1) if block else "-")):
            table[key][0] += 8 * m.nbytes
            table[key][1] += m.shape[0] * m.shape[1]
    return ["bits per weight per kind: " + ", ".join(f"{k} {b / n:.2f}" for k, (b, n) in kinds.items()),
            "bits per weight per block: " + " ".join(f"{b / n:.2f}" for b, n in blocks.values())]


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    from ..formats.gguf import is_gguf

    if is_gguf(Path(str(path)).expanduser()):
        return inspect_gguf(Path(str(path)).expanduser())
    folder = resolve_model(str(path))
    with CheckpointReader(folder) as reader:
        qconfig = reader.config.get("quantization_config")
        if not qconfig:
            raise ModelError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)",
                             "quantize it first, e.g. quantize-llm rtn MODEL -o OUT")
        modules = QuantizedModules(reader)
        info = CheckpointInfo(str(folder), str(qconfig.get("quant_method")), total_bytes=reader.total_bytes)
        for prefix in modules.prefixes:
            header = modules.describe(prefix)
            nbytes = sum(reader.nbytes(full) for full in modules.tensors(prefix).values())
            info.modules.append(ModuleInfo(prefix, header.bits, header.group_size, header.sym, header.shape,
                                           nbytes, header.codebook))
            info.quantized_bytes += nbytes
            info.quantized_params += header.shape[0] * header.shape[1]
    return info


def inspect_gguf(path: Path) -> CheckpointInfo:
    """A GGUF file's quantized tensors from its header: ggml type (shown where the codebook goes),
    block size, nominal bits and bytes."""
    import gguf

    from ..core.ggml import TYPES

    reader = gguf.GGUFReader(str(path))
    info = CheckpointInfo(str(path), "gguf", total_bytes=path.stat().st_size)
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in TYPES:          # F32/F16 tensors, and block types this tool does not write
            continue
        shape = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else (1, int(t.shape[0]))
        block = TYPES[kind]
        info.modules.append(ModuleInfo(t.name.removesuffix(".weight"), int(block.bits), block.block, False, shape,
                                       int(t.n_bytes), kind))
        info.quantized_bytes += int(t.n_bytes)
        info.quantized_params += shape[0] * shape[1]
    return info
