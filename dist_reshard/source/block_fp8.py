"""Block-quantized FP8 sources (DeepSeek-V3 as published), dequantized on the fly by the ranks that read them.

Such a checkpoint stores a linear weight W as float8 values Q plus `<name>_scale_inv`, one factor per block
of b0 rows x b1 columns (`quantization_config.weight_block_size`, 128 x 128 for DeepSeek-V3):
W[r, c] = bf16(float32(Q[r, c]) * scale_inv[r // b0, c // b1]), as DeepSeek's own `weight_dequant` does.
The index presents each such weight as the bfloat16 tensor it stands for, so the planner slices it like any
other; a read of rows [a, b) carries the scale rows [a // b0, ceil(b / b0)) with it, and only those rows are
dequantized, on the reading rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..base.dtypes import TORCH_DTYPES
from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig
from ..formats.safetensors_index import SourceTensor

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16")
DECODED_DTYPE = "BF16"


def block_size(cfg: ModelConfig, config_path: str) -> tuple[int, int] | None:
    """(b0, b1) of an fp8 `quantization_config`; None when the config declares no fp8 quantization."""
    q = cfg.raw.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    b = q.get("weight_block_size")
    if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                        for x in b)):
        raise ConversionError(f"{config_path}: quantization_config.weight_block_size = {b!r} is not a pair of "
                              f"positive integers (per-tensor FP8 scales are not supported)")
    return b[0], b[1]


def dequantized_index(index: dict[str, SourceTensor], cfg: ModelConfig,
                      config_path: str = "config.json") -> dict[str, SourceTensor]:
    """The index with every FP8 weight replaced by its bfloat16 meaning and its scale tensor folded into it."""
    fp8 = [n for n, t in index.items() if t.dtype in FP8_DTYPES]
    scales = [n for n in index if n.endswith(SCALE_SUFFIX)]
    if not fp8 and not scales:
        return index
    block = block_size(cfg, config_path)
    if block is None:
        name = (fp8 or scales)[0]
        raise ConversionError(f"{index[name].file}: tensor {name!r} is {index[name].dtype}, but {config_path} has no "
                              f"quantization_config with quant_method 'fp8' and weight_block_size to decode it")
    for name in scales:
        base = name[:-len(SCALE_SUFFIX)]
        if base not in index or index[base].dtype not in FP8_DTYPES:
            raise ConversionError(f"{index[name].file}: tensor {name!r} holds block scales for {base!r}, "
                                  f"which is not an FP8 tensor of this checkpoint")
    out = {}
    for name, t in index.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype not in FP8_DTYPES:
            out[name] = t
            continue
        s = index.get(name + SCALE_SUFFIX)
        if s is None:
            raise ConversionError(f"{t.file}: FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r} block scales")
        if len(t.shape) != 2:
            raise ConversionError(f"{t.file}: FP8 tensor {name!r} has shape {list(t.shape)}; only 2-D weights "
                                  f"are block-quantized")
        want = [math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1])]
        if list(s.shape) != want or s.dtype not in SCALE_DTYPES:
            raise ConversionError(f"{s.file}: tensor {s.name!r} is {s.dtype} {list(s.shape)}; {block[0]}x{block[1]} "
                                  f"blocks of {name!r} {list(t.shape)} need F32 {want}")
        out[name] = dataclasses.replace(t, dtype=DECODED_DTYPE, stored_dtype=t.dtype, encoding="fp8_block",
                                        scale=s, block=block)
    return out


def scale_rows(src: SourceTensor, rows: tuple[int, int]) -> tuple[int, int]:
    """The scale rows that rows [a, b) of a block-quantized tensor need."""
    b0 = src.block[0]
    return rows[0] // b0, -(-rows[1] // b0)


def dequantize(raw: torch.Tensor, src: SourceTensor, rows: tuple[int, int],
               device: torch.device | None = None) -> torch.Tensor:
    """Rows [a, b) of `src` as bfloat16 bytes (on the CPU), from their FP8 bytes followed by their scale rows'
    bytes. With a CUDA `device` the arithmetic runs there; the result is the CPU's, bit for bit: the same
    float32 products rounded to nearest even, and a NaN written as the CPU writes it (`_cpu_nan_bits`)."""
    b0, b1 = src.block
    lo, hi = rows
    cols = src.shape[1]
    n = hi - lo
    on_gpu = device is not None and device.type == "cuda"
    if on_gpu:
        raw = raw.to(device)
    stored = n * src.stored_row_bytes
    q = raw[:stored].view(TORCH_DTYPES[src.stored_dtype]).view(n, cols)
    first, _ = scale_rows(src, rows)
    scale_dtype = TORCH_DTYPES[src.scale.dtype]
    tail = raw[stored:]
    if tail.storage_offset() % scale_dtype.itemsize:
        tail = tail.clone()  # rows of an odd byte count leave the scales unaligned for a float view
    factors = tail.view(scale_dtype).view(-1, src.scale.shape[1]).float()
    factors = factors.repeat_interleave(b1, dim=1)[:, :cols]
    out = torch.empty((n, cols), dtype=TORCH_DTYPES[src.dtype], device=raw.device)
    r = lo
    while r < hi:  # one block row at a time: the float32 temporary stays at b0 rows
        end = min(hi, (r // b0 + 1) * b0)
        out[r - lo:end - lo].copy_(q[r - lo:end - lo].float() * factors[r // b0 - first])
        r = end
    if on_gpu:
        # CUDA's float -> bf16 writes every NaN as 0x7FFF; the CPU's vectorised cast writes its own pattern.
        out.view(torch.int16).masked_fill_(torch.isnan(out), _cpu_nan_bits(out.dtype))
        out = out.cpu()
    return out.view(-1).view(torch.uint8)


@functools.cache
def _cpu_nan_bits(dtype: torch.dtype) -> int:
    """The bits the CPU path above writes for a NaN: its cast, a float32 tensor copied into a `dtype` one."""
    return int(torch.empty(64, dtype=dtype).copy_(torch.full((64,), float("nan"))).view(torch.int16)[0])
