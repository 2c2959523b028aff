"""Source tensor index built from safetensors headers alone (never the data).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header, then the data
buffer; header offsets are relative to the buffer. Everything the planner needs (names, dtypes, shapes
and absolute byte offsets) comes from here, validated against the file sizes so that a truncated
download or a corrupt header is refused before any rank reads or writes a byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property

from ..base.errors import ConversionError

# Bytes per element for every safetensors dtype the converter accepts.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}

# A header larger than this is not a model header; refusing it bounds what a hostile file can allocate.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str  # path of the safetensors file
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `file`
    nbytes: int
    # None: raw row-major bytes (safetensors, legacy .pt records). "torch_save": a torch.save blob of the
    # tensor (a torch_dist chunk), read whole and decoded; `nbytes` is then the blob's length.
    # "fp8_block": float8 rows stored as `stored_dtype`, decoded to `dtype` with the per-block factors of
    # `scale` (DeepSeek's `weight_scale_inv`, one float32 per `block` of rows x columns).
    # "permuted": one expert's slab of a fused HF expert tensor, stored as `stored_shape` and read whole; the
    # tensor is that slab with its axes permuted by `perm`, flattened to `shape` (see fused_experts.py).
    # "mxfp4": one expert's MXFP4 blocks (`nbytes` of `stored_dtype` U8) and its scales (`scale`, read after them),
    # both read whole and decoded to `dtype`, rows then permuted as for "permuted" (see mxfp4.py).
    encoding: str | None = None
    stored_dtype: str | None = None
    scale: SourceTensor | None = None
    block: tuple[int, int] | None = None
    stored_shape: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None

    @property
    def read_whole(self) -> bool:
        """Read in one piece whatever rows are wanted: a torch.save blob, or a slab whose rows are not the
        stored ones."""
        return self.encoding in ("torch_save", "permuted", "mxfp4")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def rows(self) -> int:
        """Extent of dim 0 (the element count for a 1-D tensor, 1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @cached_property  # hot in planning; the fields never change
    def data_bytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @cached_property  # hot in planning; the fields never change
    def row_bytes(self) -> int:
        """Bytes of one decoded dim-0 row (what is exchanged and written)."""
        return self.data_bytes // self.rows if self.rows else 0

    @cached_property  # hot in planning; the fields never change
    def stored_row_bytes(self) -> int:
        """Bytes of one dim-0 row on disk; a dim-0 slice is one contiguous range of these."""
        if self.stored_dtype is None:
            return self.row_bytes
        return math.prod(self.shape[1:]) * DTYPE_SIZES[self.stored_dtype]


def _header_error(path: str, what: str) -> ConversionError:
    return ConversionError(f"{path}: invalid safetensors header: {what}")


def read_header(path: str) -> tuple[dict, int, int]:
    """Return (header dict, data buffer start, file size) after checking the framing."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _header_error(path, f"file is {size} bytes, shorter than the 8-byte length prefix")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _header_error(path, f"header length {n} exceeds the file size {size} (truncated file?)")
            raw = f.read(n)
    except FileNotFoundError:
        raise ConversionError(f"{path}: safetensors file not found") from None
    except IsADirectoryError:
        raise ConversionError(f"{path}: expected a safetensors file, found a directory") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _header_error(path, f"not JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise _header_error(path, "top level is not a JSON object")
    return header, 8 + n, size


def parse_file(path: str) -> dict[str, SourceTensor]:
    """Index one safetensors file; every offset is checked against the file size and for overlaps."""
    header, data_start, size = read_header(path)
    buffer_bytes = size - data_start
    tensors: dict[str, SourceTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _header_error(path, f"entry for tensor {name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _header_error(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _header_error(path, f"tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _header_error(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if begin < 0 or end < begin:
            raise _header_error(path, f"tensor {name!r} has data_offsets {offsets} that run backwards")
        if end - begin != expected:
            raise _header_error(path, f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, "
                                      f"shape {shape} of {dtype} needs {expected}")
        if end > buffer_bytes:
            raise ConversionError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                                  f"{size} bytes (truncated file or corrupt header)")
        tensors[name] = SourceTensor(name, path, dtype, tuple(shape), data_start + begin, expected)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _header_error(path, f"tensors {n0!r} and {n1!r} overlap")
    return tensors


def index_folder(folder: str) -> dict[str, SourceTensor]:
    """Index an HF model folder: `model.safetensors.index.json` when present, else every *.safetensors."""
    if not os.path.isdir(folder):
        raise ConversionError(f"--load {folder}: not a directory")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of tensor name -> file name")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{index_path}: unreadable index ({e.__class__.__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"--load {folder}: no *.safetensors files and no model.safetensors.index.json")
    tensors: dict[str, SourceTensor] = {}
    for fname in files:
        if not isinstance(fname, str) or os.path.basename(fname) != fname:
            raise ConversionError(f"{index_path}: weight_map names a file outside the folder: {fname!r}")
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            raise ConversionError(f"{path}: shard file named in model.safetensors.index.json is missing")
        for name, t in parse_file(path).items():
            if weight_map is not None and weight_map.get(name) != fname:
                continue  # the index is authoritative; stray copies in other files are ignored
            if name in tensors:
                raise ConversionError(f"{path}: tensor {name!r} also appears in {tensors[name].file}")
            tensors[name] = t
    if weight_map is not None:
        missing = sorted(n for n in weight_map if n not in tensors)
        if missing:
            raise ConversionError(f"{os.path.join(folder, weight_map[missing[0]])}: tensor {missing[0]!r} listed in "
                                  f"the index is not in the file ({len(missing)} missing)")
    return tensors
