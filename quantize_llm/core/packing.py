"""Pure bit packing: int32 words (FORMATS.md §1.4) and bitsandbytes' uint8 nibbles (§3.2).

The GPTQ rule, used along either dimension: split the codes along the packed dimension into blocks
of 32; each block is a 32*bits-bit little-endian string (code k at bits [k*bits, (k+1)*bits)) cut
into `bits` consecutive int32 words. For 2/4/8 bits no code straddles a word; for 3 bits codes 10
and 21 of each block do.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = (1 << 32) - 1


def _to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def packed_length(n: int, bits: int) -> int:
    """Number of words that hold `n` codes; n must fill whole words (whole blocks for 3 bits)."""
    if bits == 3:
        if n % 32:
            raise ValueError(f"3-bit packing needs a multiple of 32 values, got {n}")
        return n // 32 * 3
    if (n * bits) % 32:
        raise ValueError(f"{bits}-bit packing needs a multiple of {32 // bits} values, got {n}")
    return n * bits // 32


def pack_int32(codes: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Pack unsigned codes (< 2^bits) of a 2-D tensor along `dim` into int32 words.

    codes (n, m) with dim=0 -> (n*bits/32, m); with dim=1, (m, n) -> (m, n*bits/32).
    Does not modify `codes`.
    """
    if dim == 1:
        return pack_int32(codes.t(), bits, 0).t().contiguous()
    n, m = codes.shape
    step = max(1, PACK_ELEMENTS // max(n, 1))
    if m > step:   # column slices: the int64 temporaries stay small whatever the matrix
        out = torch.empty(packed_length(n, bits), m, dtype=torch.int32, device=codes.device)
        for c0 in range(0, m, step):
            out[:, c0:c0 + step] = _pack_columns(codes[:, c0:c0 + step], bits)
        return out
    return _pack_columns(codes, bits)


# Codes packed at a time: their int64 working copies take 8 bytes each (32 MiB here).
PACK_ELEMENTS = 2 ** 22


def _pack_columns(codes: Tensor, bits: int) -> Tensor:
    """pack_int32 along dim 0 of (n, m) codes, all at once."""
    n, m = codes.shape
    n_words = packed_length(n, bits)
    if n % 32:  # 2/4/8 bits: pad to whole blocks, then drop the words that hold only padding
        codes = torch.cat([codes, codes.new_zeros(32 - n % 32, m)])
    c = codes.to(torch.int64).reshape(-1, 32, m)                        # (blocks, 32, m)
    words = torch.zeros(c.shape[0], bits, m, dtype=torch.int64, device=codes.device)
    for k in range(32):
        start = k * bits                                                # bit offset in the string
        j, off = divmod(start, 32)
        words[:, j] |= (c[:, k] << off) & _MASK32
        if off + bits > 32:                                             # straddles into word j+1
            words[:, j + 1] |= c[:, k] >> (32 - off)
    return _to_int32(words.reshape(-1, m)[:n_words]).contiguous()


def unpack_int32(words: Tensor, bits: int, n: int, dim: int = 0) -> Tensor:
    """Inverse of `pack_int32`: int32 words -> uint8 codes, `n` codes along `dim`."""
    if dim == 1:
        return unpack_int32(words.t(), bits, n, 0).t().contiguous()
    m = words.shape[1]
    if words.shape[0] != packed_length(n, bits):
        raise ValueError(f"{words.shape[0]} words cannot hold {n} {bits}-bit codes")
    step = max(1, PACK_ELEMENTS // max(n, 1))
    if m > step:   # column slices: the int32/int64 temporaries stay small whatever the matrix
        out = torch.empty(n, m, dtype=torch.uint8, device=words.device)
        for c0 in range(0, m, step):
            out[:, c0:c0 + step] = _unpack_columns(words[:, c0:c0 + step], bits, n)
        return out
    return _unpack_columns(words, bits, n)


def _unpack_columns(words: Tensor, bits: int, n: int) -> Tensor:
    """unpack_int32 along dim 0 of (words, m), all at once."""
    m = words.shape[1]
    if bits != 3:   # no code straddles a word: one shift per field, all words at once
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, per_word, 1)
        fields = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)     # (words, per_word, m)
        return fields.reshape(-1, m)[:n].to(torch.uint8).contiguous()
    w = words.to(torch.int64) & _MASK32
    n_blocks = -(-n // 32)
    full = n_blocks * bits
    if w.shape[0] < full:
        w = torch.cat([w, w.new_zeros(full - w.shape[0], m)])
    w = w.reshape(n_blocks, bits, m)                                    # (blocks, bits, m)
    out = torch.empty(n_blocks, 32, m, dtype=torch.int64, device=words.device)
    mask = (1 << bits) - 1
    for k in range(32):
        j, off = divmod(k * bits, 32)
        v = w[:, j] >> off
        if off + bits > 32:
            v = v | (w[:, j + 1] << (32 - off))
        out[:, k] = v & mask
    return out.reshape(-1, m)[:n].to(torch.uint8).contiguous()


def pack_nibbles(codes: Tensor, pad: int = 0) -> Tensor:
    """bitsandbytes' 4-bit packing: flat codes (< 16, any shape, row-major) -> uint8 (ceil(n/2), 1).

    Element 2k goes to the HIGH nibble of byte k, element 2k+1 to the low nibble. An odd count is
    padded with the code `pad` (bitsandbytes pads with the code of 0.0). Does not modify `codes`.
    """
    flat = codes.reshape(-1).to(torch.uint8)                            # (n,)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad)])
    return ((flat[0::2] << 4) | flat[1::2]).view(-1, 1).contiguous()    # (ceil(n/2), 1)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of `pack_nibbles`: uint8 bytes (any shape) -> the first `n` codes, uint8 (n,)."""
    flat = packed.reshape(-1).to(torch.uint8)
    if flat.numel() != -(-n // 2):
        raise ValueError(f"{flat.numel()} bytes cannot hold {n} 4-bit codes (need {-(-n // 2)})")
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].contiguous()


# AutoAWQ's GEMM order (FORMATS.md §2.3): nibble i of a word holds column 8j + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(codes: Tensor) -> Tensor:
    """4-bit codes (rows, cols), cols a multiple of 8 -> int32 (rows, cols/8) in the AWQ order:
    word j of a row holds columns 8j..8j+7, nibble i (bits 4i..4i+3) column 8j + AWQ_ORDER[i]."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]   # nibble order
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    return _to_int32((c << shifts).sum(-1)).contiguous()               # disjoint bits: sum == or


def unpack_awq(words: Tensor) -> Tensor:
    """Inverse of `pack_awq`: int32 (rows, cols/8) -> uint8 codes (rows, cols)."""
    rows, n_words = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF                    # (rows, words, 8) in nibble order
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles                               # nibble i -> column AWQ_ORDER[i]
    return out.reshape(rows, n_words * 8).to(torch.uint8).contiguous()
