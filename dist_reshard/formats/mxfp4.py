"""MXFP4 expert weights (GPT-OSS as published), decoded to bfloat16 by the rank that reads them.

`<name>_blocks` [E, R, C/32, 16] (uint8) holds an expert's R x C weight in the linear layer's orientation as
4-bit E2M1 codes, two per byte, the low nibble first; `<name>_scales` [E, R, C/32] (uint8) one E8M0 exponent
per 32 consecutive values: w = fp4(code) * 2^(scale - 127). Each expert's slab (its blocks and its scales, both
contiguous in the file) is presented as one bfloat16 tensor, read whole by the rank that needs it and decoded
there; a row permutation (GPT-OSS's alternating gate/up rows into gate rows then up rows) follows the decoding.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..base.errors import ConversionError
from .safetensors_index import SourceTensor

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # values per scale
DECODED_DTYPE = "BF16"
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_experts(index: dict[str, SourceTensor], name: str, per_expert: str, shape: tuple[int, int],
                  view: tuple[int, ...] | None, perm: tuple[int, ...] | None, experts: int) -> dict[str, SourceTensor]:
    """Expert e's `per_expert` tensor (`shape`, bf16) for each e, from `name`'s blocks and scales, which leave
    `index`."""
    blocks, scales = index.pop(name + BLOCKS), index.pop(name + SCALES, None)
    if scales is None:
        raise ConversionError(f"{blocks.file}: MXFP4 tensor {blocks.name!r} has no {name + SCALES!r}")
    rows, cols = shape
    want_blocks, want_scales = [experts, rows, cols // GROUP, GROUP // 2], [experts, rows, cols // GROUP]
    if cols % GROUP or list(blocks.shape) != want_blocks or blocks.dtype != "U8":
        raise ConversionError(f"{blocks.file}: tensor {blocks.name!r} is {blocks.dtype} {list(blocks.shape)}; "
                              f"{experts} experts of {rows} x {cols} need U8 {want_blocks}")
    if list(scales.shape) != want_scales or scales.dtype != "U8":
        raise ConversionError(f"{scales.file}: tensor {scales.name!r} is {scales.dtype} {list(scales.shape)}; "
                              f"{blocks.name!r} needs U8 {want_scales}")
    out = {}
    block_bytes, scale_bytes = blocks.nbytes // experts, scales.nbytes // experts
    for e in range(experts):
        n = per_expert.format(e=e)
        scale = dataclasses.replace(scales, name=f"{n} (scales)", shape=(scale_bytes,),
                                    offset=scales.offset + e * scale_bytes, nbytes=scale_bytes)
        out[n] = SourceTensor(n, blocks.file, DECODED_DTYPE, shape, blocks.offset + e * block_bytes, block_bytes,
                              encoding="mxfp4", stored_dtype="U8", scale=scale, stored_shape=view, perm=perm)
    return out


def dequantize_mxfp4(raw: torch.Tensor, src: SourceTensor) -> torch.Tensor:
    """A slab's blocks followed by its scales -> the bf16 tensor it stands for (rows permuted), as bytes."""
    rows, cols = src.shape
    codes = raw[:src.nbytes].view(-1, GROUP // 2).long()
    exponents = raw[src.nbytes:src.nbytes + src.scale.nbytes].to(torch.int32) - 127
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    values = torch.empty(codes.shape[0], GROUP, dtype=torch.float32)
    values[:, 0::2] = lut[codes & 0x0F]
    values[:, 1::2] = lut[codes >> 4]
    out = torch.ldexp(values, exponents[:, None].float()).to(torch.bfloat16).view(rows, cols)
    if src.perm is not None:
        out = out.view(src.stored_shape).permute(src.perm).contiguous()
    assert out.numel() == math.prod(src.shape)
    return out.reshape(-1).view(torch.uint8)
