"""Pure math of bitsandbytes' 4-bit codebooks (NF4, FP4) and their nested 8-bit absmax.

FORMATS.md §3. Everything here reproduces, bit for bit, what `bitsandbytes.functional.quantize_4bit`
computes on the CPU (bitsandbytes 0.50): the same float32 operations in the same order, so that
the codes, absmax and nested statistics we write are the ones bitsandbytes would write for the
same weight. bitsandbytes itself is never imported.

Layout: the weight (out, in) is flattened row-major to n values; blocks are `blocksize`
consecutive values of that flat array (they cross row boundaries; the last may be partial).
`w' = table[code] * absmax[block]`, computed in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

CODEBOOKS = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256               # double quantization: absmax values per nested block

# NF4 (QLoRA): quantiles of N(0, 1), normalised to [-1, 1]; sorted, index = code.
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by 12 below.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

_TINY = 1e-38                        # bitsandbytes' floor on absmax before taking its reciprocal


def code_table(codebook: str, device: torch.device | str | None = None) -> Tensor:
    """The 16 values of `codebook` ("nf4" | "fp4"), float32 (16,), indexed by the 4-bit code.

    FP4 is in bit-pattern order (not sorted; bit 3 is the sign), divided by 12 in float32 as
    bitsandbytes' `get_4bit_type` does.
    """
    if codebook == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    if codebook == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32, device=device)
        return raw / raw.abs().max()
    raise ValueError(f"unknown codebook {codebook!r}; expected one of {CODEBOOKS}")


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map, float32 (256,) sorted ascending (FORMATS.md §3.3).

    Same construction as `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`:
    for i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) (float32) scaled by 10^(i-6),
    with their negatives; plus 0 and 1.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0                         # (2^i,) float32
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def block_absmax(weight: Tensor, blocksize: int) -> Tensor:
    """absmax float32 (ceil(numel / blocksize),) of the row-major flattened `weight`, as stored.

    A partial last block's absmax is floored at 1e-38 (an all-zero tail stores 1e-38); a full
    all-zero block stores 0. Does not modify `weight`.
    """
    flat = weight.reshape(-1)
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1).float()  # (full/bs,)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().float().clamp(min=_TINY).view(1)])
    return absmax


def _scale_blocks(flat: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    """The float32 values (n,) scaled into [-1, 1] by their block's absmax.

    Full blocks are multiplied by the float32 reciprocal of their (floored) absmax and the partial
    last block is divided by its absmax: the two operations bitsandbytes uses, which round
    differently.
    """
    full = flat.numel() - flat.numel() % blocksize
    nfull = full // blocksize
    blocks = flat[:full].view(-1, blocksize)                            # (full/bs, bs)
    scaled = torch.clamp(blocks * (1.0 / absmax[:nfull].clamp(min=_TINY)).view(-1, 1), -1, 1).reshape(-1)
    if full < flat.numel():
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / absmax[nfull], -1, 1)])
    return scaled


def thresholds(table: Tensor) -> tuple[Tensor, Tensor]:
    """(order, bounds) of a table (16,): order int64 (16,) maps a sorted position to its code,
    bounds float32 (15,) are the midpoints of the sorted table (+0 sorts before -0)."""
    order = torch.argsort(table, stable=True)                           # (16,) sorted position -> code
    ordered = table[order]
    return order, (ordered[:-1] + ordered[1:]) / 2                      # (16,), (15,)


def nearest_codes(scaled: Tensor, table: Tensor) -> Tensor:
    """Index into `table` (16,) of the nearest entry to each value of `scaled`, int64.

    Decision thresholds are the float32 midpoints of the sorted table; a value exactly on a
    threshold goes to the lower entry (torch.bucketize, right=False). For FP4 the sorted position
    is mapped back to the bit pattern (+0 precedes -0 in the sorted order, so 0 encodes as 0b0000).
    """
    order, bounds = thresholds(table)
    return order[torch.bucketize(scaled, bounds)]


def quantize_4bit(weight: Tensor, codebook: str, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise absmax quantization of `weight` (any shape, float) onto a 4-bit codebook.

    Returns codes uint8 with the shape of `weight` (each in [0, 16)) and absmax float32
    (ceil(numel / blocksize),). Works in float32; does not modify `weight`.
    """
    flat = weight.reshape(-1).float()                                   # (n,) row-major
    absmax = block_absmax(flat, blocksize)
    codes = nearest_codes(_scale_blocks(flat, absmax, blocksize), code_table(codebook, flat.device))
    return codes.to(torch.uint8).view(weight.shape), absmax


def dequantize_4bit(codes: Tensor, absmax: Tensor, codebook: str, blocksize: int) -> Tensor:
    """table[code] * absmax[block] in float32, with the shape of `codes`."""
    flat = codes.reshape(-1).long()                                     # (n,)
    block = torch.arange(flat.numel(), device=flat.device) // blocksize
    values = code_table(codebook, flat.device)[flat] * absmax.float()[block]
    return values.view(codes.shape)


LUT_SIZE = 65536                     # bins of bitsandbytes' CPU lookup table over [-1, 1]


def dynamic_bin_entry(bins: Tensor, code: Tensor) -> Tensor:
    """bitsandbytes' CPU lookup table, evaluated at `bins` (int64, in [0, 65536)): int64 entries.

    The table maps bin i (value -1 + 2i/65535 in float32) to the number of float32 midpoints of
    `code` (sorted, (256,)) strictly below that value, i.e. to the entry nearest to the bin.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])                            # (255,) float32
    values = -1.0 + (2.0 * bins.to(torch.float32)) / (LUT_SIZE - 1)     # float32, exact 2i
    return torch.searchsorted(midpoints, values, right=False)


def quantize_8bit_dynamic(x: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Blockwise quantization of a flat float tensor onto the dynamic map, as bnb's CPU kernel does.

    Returns codes uint8 (n,) and absmax float32 (ceil(n / blocksize),). Not a plain nearest-entry
    search: bitsandbytes 0.50 on the CPU scales each value by the float32 reciprocal of its block's
    absmax, clamps it to [-1, 1], maps it to one of 65536 bins, trunc(((v + 1) * 0.5) * 65535 + 0.5)
    (each operation rounded to float32), and takes the bin's entry (`dynamic_bin_entry`). Near
    entries closer together than a bin (around 0) this can differ from the nearest entry; being
    bit-exact with bitsandbytes is the point. A block whose absmax is 0 gets code 0.
    """
    code = dynamic_map(x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.cat([flat, flat.new_zeros(nblocks * blocksize - n)]).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)                                   # (nblocks,)
    v = (blocks * (1.0 / absmax).view(-1, 1)).clamp(-1.0, 1.0)          # (nblocks, bs) float32
    bins = (((v + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)   # truncation, as cvttps
    codes = dynamic_bin_entry(bins.clamp(0, LUT_SIZE - 1), code)
    codes = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, float]:
    """Nested statistics of a float32 absmax (nblocks,): (codes uint8 (nblocks,),
    nested absmax float32 (ceil(nblocks/256),), offset).

    offset = mean(absmax) in float32 (a Python float holding that float32 value); the rest is
    `quantize_8bit_dynamic(absmax - offset)` (FORMATS.md §3.3). The mean is torch's, the call
    bitsandbytes makes: on the CPU its summation order, hence the offset's last bit, depends on
    the thread count once there are more than 32768 blocks.
    """
    offset = absmax.float().mean()
    codes, nested = quantize_8bit_dynamic(absmax.float() - offset)
    return codes, nested, float(offset)


def dequantize_absmax(codes: Tensor, nested_absmax: Tensor, offset: float, code_map: Tensor) -> Tensor:
    """absmax float32 (nblocks,) = code_map[code] * nested_absmax[block // 256] + offset.

    Two float32 roundings (product, then sum), as bitsandbytes' reader does them.
    """
    block = torch.arange(codes.numel(), device=codes.device) // NESTED_BLOCKSIZE
    scaled = code_map.float()[codes.long()] * nested_absmax.float()[block]
    return scaled + torch.tensor(offset, dtype=torch.float32, device=codes.device)
