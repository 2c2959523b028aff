"""Which of a rank's reads pass through unchanged, and where their bytes go in its output tensors' memory.

A read item whose every transfer lands on the reading rank, with no decoding and no cast, needs no user-space
copy: each of its rows (or each row's column block, for a row-parallel shard) is one contiguous byte range of
the source file and one contiguous range of an output tensor. The writers copy those ranges file to file in
the kernel (`writers/splice.py`), so the item is never read into memory. Row by row is worth it even for
small blocks: on the 2-vCPU VM, `copy_file_range` of 4 KiB pieces ran at ~1 GB/s and of 1 KiB pieces at
~0.65 GB/s, against ~0.33 GB/s for `write()` of the same bytes from memory.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..plan.data import RankPlan, Target
from ..formats.safetensors_index import DTYPE_SIZES
from .splice import Splice

# Row blocks below this many bytes stay on the memory path: one syscall per block would cost more than
# writing them from memory.
MIN_ROW_BLOCK_BYTES = 1024


def _geometry(t, src, target: Target):
    """(source bytes per row, bytes per row block, block's byte offset in a source row, target bytes per
    row, block's byte offset in a target row), or None when the transfer's bytes change on the way."""
    if target.dtype != src.dtype or src.stored_dtype is not None or target.shift:
        return None
    itemsize = DTYPE_SIZES[src.dtype]
    src_row = src.row_bytes
    c0, c1 = t.cols if t.cols is not None else (0, src_row // itemsize)
    dst_row = target.nbytes // target.rows
    block, dst_at = (c1 - c0) * itemsize, t.dst_col * itemsize
    if dst_at + block > dst_row:
        return None
    return src_row, block, c0 * itemsize, dst_row, dst_at


def _whole_rows(geometry) -> bool:
    src_row, block, src_at, dst_row, _ = geometry
    return block == src_row == dst_row and src_at == 0


def direct_reads(view: RankPlan, items, targets: dict[int, Target], index: dict) -> dict[int, list]:
    """Read items whose bytes pass through unchanged (item index -> its transfers, each with its
    `_geometry`): all of them to this rank, each byte to one place, no decoding, no cast, and either whole
    rows or row blocks of at least MIN_ROW_BLOCK_BYTES."""
    local: dict[int, list] = defaultdict(list)
    fanout: dict[int, int] = defaultdict(int)
    for sends in view.sends:
        for dst, transfers in sends.items():
            for t in transfers:
                fanout[t.item] += 1
                if dst == view.rank:
                    local[t.item].append(t)
    direct = {}
    for i, transfers in local.items():
        item = items[i]
        if len(transfers) != fanout[i] or item.encoding is not None or item.aux is not None:
            continue
        if sum(t.nbytes for t in transfers) != item.nbytes:
            continue  # bytes wanted twice (a norm in two TP files of this rank): read once, copied in memory
        if any(targets[t.target].stored_layout is not None for t in transfers):
            continue  # its bytes are rearranged before they are written
        src = index[item.source]
        shapes = [_geometry(t, src, targets[t.target]) for t in transfers]
        if all(g is not None and (_whole_rows(g) or g[1] >= MIN_ROW_BLOCK_BYTES) for g in shapes):
            direct[i] = list(zip(transfers, shapes))
    return direct


def splices(direct: dict[int, list], items, tensors: dict[int, torch.Tensor],
            targets: dict[int, Target]) -> dict[int, list[Splice]]:
    """Per write unit, the direct items as file-to-file copies into its tensors' memory: one per transfer
    of whole rows, one per row block otherwise."""
    out: dict[int, list[Splice]] = defaultdict(list)
    for i, transfers in direct.items():
        item = items[i]
        for t, g in transfers:
            src_row, block, src_at, dst_row, dst_at = g
            base = tensors[t.target].data_ptr() + t.dst_row * dst_row + dst_at
            first = item.offset + (t.rows[0] - item.rows[0]) * src_row + src_at
            rows = t.rows[1] - t.rows[0]
            unit = out[targets[t.target].unit]
            if _whole_rows(g):
                unit.append(Splice(base, rows * block, item.file, first))
            else:
                unit += [Splice(base + r * dst_row, block, item.file, first + r * src_row) for r in range(rows)]
    return dict(out)
