"""Bytes as read -> bytes as planned, for the source encodings a read item may carry (see
`SourceTensor.encoding`): torch_dist chunks stored as torch.save blobs, FP8 block-quantized rows, expert
slabs of fused HF expert tensors whose axes are permuted, and MXFP4 expert slabs."""

from __future__ import annotations

import torch

from ..source.block_fp8 import dequantize
from ..base.dtypes import DTYPE_NAMES, TORCH_DTYPES
from ..base.errors import ConversionError
from ..formats.mxfp4 import dequantize_mxfp4
from ..plan.data import ReadItem
from ..plan.reads import read_item
from ..formats.safe_pickle import load_tensor_blob
from ..formats.safetensors_index import SourceTensor


def decode(item: ReadItem, raw: torch.Tensor, index: dict[str, SourceTensor],
           device: torch.device | None = None) -> torch.Tensor:
    """The item's rows, row-major, in the source tensor's (decoded) dtype, as a flat uint8 CPU tensor. FP8 rows
    are dequantized on `device` when it is a GPU (the exchange's device: the arithmetic there is free)."""
    if item.encoding is None:
        return raw
    src = index[item.source]
    if item.encoding == "fp8_block":
        return dequantize(raw, src, item.rows, device)
    if item.encoding == "permuted":
        return permuted(raw, src)
    if item.encoding == "mxfp4":
        return dequantize_mxfp4(raw, src)
    t = load_tensor_blob(raw.numpy().tobytes(), f"{item.file}: chunk {item.source}")
    data = t.contiguous().view(-1).view(torch.uint8)
    if data.numel() != src.data_bytes or DTYPE_NAMES.get(t.dtype) != src.dtype:
        raise ConversionError(f"{item.file}: chunk {item.source} holds {t.dtype} {list(t.shape)}, the metadata "
                              f"says {src.dtype} {list(src.shape)}")
    return data


def permuted(raw: torch.Tensor, src: SourceTensor) -> torch.Tensor:
    """A slab as stored (`src.stored_shape`) with its axes permuted by `src.perm`, row-major bytes."""
    dtype = TORCH_DTYPES[src.dtype]
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()  # a slab after an odd byte count is unaligned for a typed view
    slab = raw.view(dtype).view(src.stored_shape)
    return slab.permute(src.perm).contiguous().view(-1).view(torch.uint8)


def read_rows(reader, src: SourceTensor, rows: tuple[int, int], index: dict[str, SourceTensor]) -> torch.Tensor:
    """Rows [a, b) of a source tensor, decoded (a blob-encoded tensor is read whole, whatever the rows)."""
    item = read_item(-1, src, rows, 0)
    return decode(item, reader.read(item), index)
