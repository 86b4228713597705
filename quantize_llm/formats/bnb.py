"""The bitsandbytes 4-bit layout (FORMATS.md §3), as transformers + bitsandbytes save and load it.

Per Linear `<p>` (local names below, after the module prefix):
    weight                                 uint8 (ceil(out*in/2), 1)  two codes per byte, high nibble first
    weight.absmax                          float32 (nblocks,), or uint8 (nblocks,) when nested
    weight.quant_map                       float32 (16,)              the codebook's table
    weight.nested_absmax                   float32 (ceil(nblocks/256),)  only with double quant
    weight.nested_quant_map                float32 (256,)             only with double quant
    weight.quant_state.bitsandbytes__nf4   uint8 (len(json),)         the non-tensor fields, as JSON
    (or __fp4)
The bias stays in the model's dtype. Blocks run over the row-major flattened weight.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import nf4codes
from ..core.packing import pack_nibbles, unpack_nibbles
from ..core.qweight import NestedAbsmax, QuantizedWeight
from ..core.spec import QuantSpec
from .base import (
    ConfigFacts,
    ModuleHeader,
    TensorHeader,
    check_finite,
    check_finite_number,
    config_method,
    headers_of,
    need,
)

_STATE = "weight.quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BnbFormat:
    name: ClassVar[str] = "bnb"
    quant_method: ClassVar[str] = "bitsandbytes"          # config.json's quant_method
    tensor_names: ClassVar[tuple[str, ...]] = (
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        *(_STATE + c for c in nf4codes.CODEBOOKS))
    markers: ClassVar[tuple[str, ...]] = tuple(_STATE + c for c in nf4codes.CODEBOOKS)  # one per module
    bias_dtype: ClassVar[torch.dtype | None] = None        # keep the checkpoint's dtype
    config_file: ClassVar[str | None] = None               # config.json is all transformers reads
    per_module: ClassVar[bool] = False    # one setting for the whole checkpoint
    description: ClassVar[str] = "bitsandbytes 4-bit layout that transformers (with bitsandbytes) and vLLM load"

    @staticmethod
    def supports(spec: QuantSpec) -> str | None:
        if spec.codebook not in nf4codes.CODEBOOKS:
            return (f"the bnb format stores the 4-bit nf4/fp4 codebooks, not {spec.codebook!r} integer grids; "
                    "use --quant-type nf4 or fp4")
        return None

    @staticmethod
    def check_shape(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
        return None   # flat blocks: any shape, a partial last block and an odd count included

    @staticmethod
    def min_zero(spec: QuantSpec) -> int:
        return 0

    @staticmethod
    def encode(qw: QuantizedWeight) -> dict[str, Tensor]:
        if not qw.is_codebook:
            raise ValueError("the bnb format stores nf4/fp4 results, not integer grids")
        spec = qw.spec
        table = nf4codes.code_table(spec.codebook)
        # bitsandbytes pads an odd count with the value 0.0, i.e. with the code nearest to 0.
        pad = int(nf4codes.nearest_codes(torch.zeros(1), table))
        dtype = str(qw.source_dtype or torch.float32).removeprefix("torch.")
        blob: dict[str, Any] = {"quant_type": spec.codebook, "blocksize": spec.blocksize, "dtype": dtype,
                                "shape": list(qw.shape)}
        tensors = {"weight": pack_nibbles(qw.codes.cpu(), pad)}               # (ceil(n/2), 1) uint8
        if isinstance(qw.scale, NestedAbsmax):
            nested = qw.scale.to("cpu")
            tensors["weight.absmax"] = nested.codes.to(torch.uint8).contiguous()   # (nblocks,)
            tensors["weight.quant_map"] = table
            tensors["weight.nested_absmax"] = nested.absmax.float().contiguous()
            tensors["weight.nested_quant_map"] = nested.code_map.float().contiguous()
            blob.update({"nested_blocksize": nf4codes.NESTED_BLOCKSIZE, "nested_dtype": "float32",
                         "nested_offset": nested.offset})
        else:
            tensors["weight.absmax"] = qw.scale.float().cpu().contiguous()        # (nblocks,)
            tensors["weight.quant_map"] = table
        # bitsandbytes' pack_dict_to_tensor: json.dumps with default separators, UTF-8, uint8.
        tensors[_STATE + spec.codebook] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
        return tensors

    @staticmethod
    def _quant_state(names: Sequence[str], read: Callable[[str], Tensor]) -> dict[str, Any]:
        """The JSON blob of one module; its key's suffix must name its quant_type (§3.6.3)."""
        states = [k for k in names if k.startswith(_STATE)]
        if len(states) != 1:
            raise ValueError(f"expected exactly one {_STATE}nf4/fp4 tensor, found {len(states)}")
        raw = read(states[0])
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError(f"{states[0]} is {str(raw.dtype).removeprefix('torch.')} {list(raw.shape)}, where "
                             "bitsandbytes stores its JSON as uint8 bytes")
        try:
            blob = json.loads(bytes(raw.tolist()).decode())
        except ValueError:   # UnicodeDecodeError and JSONDecodeError both are
            raise ValueError(f"{states[0]} does not hold a JSON object") from None
        if not isinstance(blob, dict) or states[0] != _STATE + str(blob.get("quant_type")):
            raise ValueError(f"the quant_type in {states[0]} does not match its name")
        if blob["quant_type"] not in nf4codes.CODEBOOKS:
            raise ValueError(f"quant_type {blob['quant_type']!r} is not nf4 or fp4")
        shape = blob.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise ValueError(f"the shape {shape!r} in {states[0]} is not two positive sizes")
        if blob.get("blocksize") not in nf4codes.BLOCKSIZES:
            raise ValueError(f"blocksize {blob.get('blocksize')!r} is not one of {nf4codes.BLOCKSIZES}")
        return blob

    @staticmethod
    def describe(qconfig: Mapping[str, Any], headers: Mapping[str, TensorHeader],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        blob = BnbFormat._quant_state(list(headers), read)
        out_features, in_features = blob["shape"]
        blocksize = blob["blocksize"]
        n = out_features * in_features
        nblocks = -(-n // blocksize)
        shape = f"{out_features}x{in_features} weights"
        stored = math.prod(need(headers, "weight", torch.uint8))
        if stored != -(-n // 2):
            raise ValueError(f"weight's {stored} bytes cannot hold the {shape} (they need {-(-n // 2)})")
        need(headers, "weight.quant_map", "floating", (16,), meaning="the codebook's 16 values")
        if "weight.nested_absmax" in headers:
            if blob.get("nested_blocksize") != nf4codes.NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {blob.get('nested_blocksize')!r} is not "
                                 f"{nf4codes.NESTED_BLOCKSIZE}")
            check_finite_number("nested_offset", blob.get("nested_offset"))
            need(headers, "weight.absmax", torch.uint8, (nblocks,), meaning=f"one code per block of {blocksize}")
            need(headers, "weight.nested_absmax", "floating", (-(-nblocks // nf4codes.NESTED_BLOCKSIZE),),
                 meaning=f"one per {nf4codes.NESTED_BLOCKSIZE} of the {nblocks} blocks")
            need(headers, "weight.nested_quant_map", "floating", (256,), meaning="the 8-bit dynamic map")
        else:
            need(headers, "weight.absmax", "floating", (nblocks,), meaning=f"one per block of {blocksize} of {shape}")
        return ModuleHeader(4, blocksize, True, (out_features, in_features), blob["quant_type"])

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        header = BnbFormat.describe(qconfig, headers_of(tensors), tensors.__getitem__)
        blob = BnbFormat._quant_state(list(tensors), tensors.__getitem__)
        codebook = header.codebook
        out_features, in_features = header.shape
        table = nf4codes.code_table(codebook)
        if not torch.equal(tensors["weight.quant_map"].float(), table):
            raise ValueError(f"weight.quant_map is not the standard {codebook} table")
        codes = unpack_nibbles(tensors["weight"], out_features * in_features).view(out_features, in_features)
        nested = "weight.nested_absmax" in tensors
        scale: Tensor | NestedAbsmax
        if nested:
            check_finite("weight.nested_absmax", tensors["weight.nested_absmax"])
            check_finite("weight.nested_quant_map", tensors["weight.nested_quant_map"])
            scale = NestedAbsmax(tensors["weight.absmax"], tensors["weight.nested_absmax"].float(),
                                 float(blob["nested_offset"]), tensors["weight.nested_quant_map"].float())
            check_finite("weight.absmax (dequantized)", scale.dequantize())
        else:
            check_finite("weight.absmax", tensors["weight.absmax"])
            scale = tensors["weight.absmax"].float()
        spec = QuantSpec(method=config_method(qconfig, "nf4"), codebook=codebook, blocksize=header.group_size,
                         double_quant=nested, format="bnb")
        return QuantizedWeight(codes=codes, scale=scale, zero=None, g_idx=None, spec=spec,
                               source_dtype=_DTYPES.get(str(blob.get("dtype")), torch.float32))

    @staticmethod
    def quantization_config(facts: ConfigFacts) -> dict[str, Any]:
        """transformers' BitsAndBytesConfig.to_dict() for 4-bit (FORMATS.md §3.5), plus our `meta`.

        `llm_int8_skip_modules` lists every Linear left dense (lm_head included): given a list,
        transformers converts every other Linear and skips only those. The compute dtype is the
        model's dtype (`dtype`, float32 when unknown); the block size lives in each tensor's JSON.
        """
        spec, dense_modules, dtype = facts.spec, facts.dense_modules, facts.dtype
        config: dict[str, Any] = {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": spec.codebook,
            "bnb_4bit_use_double_quant": spec.double_quant,
            "bnb_4bit_compute_dtype": dtype if dtype in _DTYPES else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(dense_modules),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
        }
        config["meta"] = facts.meta   # provenance; transformers ignores keys it does not know
        return config
