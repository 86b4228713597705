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
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from .. import nf4codes
from ..packing import pack_nibbles, unpack_nibbles
from ..qweight import NestedAbsmax, QuantizedWeight
from ..spec import QuantSpec
from .base import ModuleHeader

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
        blob = json.loads(bytes(read(states[0]).to(torch.uint8).tolist()).decode())
        if not isinstance(blob, dict) or states[0] != _STATE + str(blob.get("quant_type")):
            raise ValueError(f"the quant_type in {states[0]} does not match its name")
        if blob["quant_type"] not in nf4codes.CODEBOOKS:
            raise ValueError(f"quant_type {blob['quant_type']!r} is not nf4 or fp4")
        return blob

    @staticmethod
    def describe(qconfig: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 read: Callable[[str], Tensor]) -> ModuleHeader:
        blob = BnbFormat._quant_state(list(shapes), read)
        out_features, in_features = (int(d) for d in blob["shape"])
        return ModuleHeader(4, int(blob["blocksize"]), True, (out_features, in_features), blob["quant_type"])

    @staticmethod
    def decode(tensors: Mapping[str, Tensor], qconfig: Mapping[str, Any]) -> QuantizedWeight:
        blob = BnbFormat._quant_state(list(tensors), tensors.__getitem__)
        codebook = str(blob["quant_type"])
        out_features, in_features = (int(d) for d in blob["shape"])
        if int(blob["blocksize"]) not in nf4codes.BLOCKSIZES:
            raise ValueError(f"blocksize {blob['blocksize']} is not one of {nf4codes.BLOCKSIZES}")
        table = nf4codes.code_table(codebook)
        if not torch.equal(tensors["weight.quant_map"].float(), table):
            raise ValueError(f"weight.quant_map is not the standard {codebook} table")
        codes = unpack_nibbles(tensors["weight"], out_features * in_features).view(out_features, in_features)
        nested = "weight.nested_absmax" in tensors
        scale: Tensor | NestedAbsmax
        if nested:
            if int(blob.get("nested_blocksize", 0)) != nf4codes.NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {blob.get('nested_blocksize')} is not 256")
            scale = NestedAbsmax(tensors["weight.absmax"].to(torch.uint8), tensors["weight.nested_absmax"].float(),
                                 float(blob["nested_offset"]), tensors["weight.nested_quant_map"].float())
        else:
            scale = tensors["weight.absmax"].float()
        meta = qconfig.get("meta") or {}
        spec = QuantSpec(method=str(meta.get("method", "nf4")), codebook=codebook, blocksize=int(blob["blocksize"]),
                         double_quant=nested, format="bnb")
        return QuantizedWeight(codes=codes, scale=scale, zero=None, g_idx=None, spec=spec,
                               source_dtype=_DTYPES.get(str(blob.get("dtype")), torch.float32))

    @staticmethod
    def quantization_config(spec: QuantSpec, modules_in_block: list[list[str]], extra: Mapping[str, Any], *,
                            dense_modules: Sequence[str] = (), dtype: str | None = None) -> dict[str, Any]:
        """transformers' BitsAndBytesConfig.to_dict() for 4-bit (FORMATS.md §3.5), plus our `meta`.

        `llm_int8_skip_modules` lists every Linear left dense (lm_head included): given a list,
        transformers converts every other Linear and skips only those. The compute dtype is the
        model's dtype (`dtype`, float32 when unknown); the block size lives in each tensor's JSON.
        """
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
        if "meta" in extra:   # provenance; transformers ignores keys it does not know
            config["meta"] = extra["meta"]
        return config
