"""Reads: each source tensor cut into row runs at every piece boundary, each run one positional read by one
rank (locality first, balanced to 1/N plus the largest item), fanned out to the targets that place it."""

from __future__ import annotations

import heapq
from collections import defaultdict

from ..families.mapping import Piece
from ..source.block_fp8 import scale_rows
from ..formats.safetensors_index import SourceTensor
from .data import Fanout, ReadItem, Target, WriteUnit


def _piece_bytes(src: SourceTensor, p: Piece, rows: tuple[int, int]) -> int:
    width = (p.cols[1] - p.cols[0]) * (src.row_bytes // src.shape[1]) if p.cols else src.row_bytes
    return (rows[1] - rows[0]) * width


def read_item(index: int, src: SourceTensor, rows: tuple[int, int], reader: int) -> ReadItem:
    """The positional read of rows [a, b) of `src` (a torch.save blob is read whole)."""
    return ReadItem(index, src.name, src.file, *_read_span(src, rows), reader, src.encoding, _scale_span(src, rows))


def _scale_span(src: SourceTensor, rows: tuple[int, int]) -> tuple[str, int, int] | None:
    """(file, offset, nbytes) of the FP8 block-scale rows that rows [a, b) of `src` need, else None."""
    if src.scale is None or src.encoding == "torch_save":
        return None
    if src.read_whole:  # an MXFP4 slab: all its scales
        return src.scale.file, src.scale.offset, src.scale.nbytes
    lo, hi = scale_rows(src, rows)
    return src.scale.file, src.scale.offset + lo * src.scale.row_bytes, (hi - lo) * src.scale.row_bytes


def _read_span(src: SourceTensor, rows: tuple[int, int], scale: tuple | None = None):
    """(rows, offset, nbytes) of the read of rows [a, b) of `src`; nbytes counts the scale rows too."""
    scale = scale if scale is not None else _scale_span(src, rows)
    if src.read_whole:
        return (0, src.rows), src.offset, src.nbytes + (scale[2] if scale else 0)
    return (rows, src.offset + rows[0] * src.stored_row_bytes,
            (rows[1] - rows[0]) * src.stored_row_bytes + (scale[2] if scale else 0))


def plan_reads(targets: list[Target], units: list[WriteUnit], index: dict[str, SourceTensor], world: int,
                max_item_bytes: int, max_sent_bytes: int) -> tuple[list[ReadItem], list[Fanout]]:
    # Targets sharing one pieces tuple (the EP copies of a legacy dense shard) consume alike: each piece is
    # listed once with all of them, not once per copy.
    alike: dict[int, tuple[tuple[Piece, ...], list[Target]]] = {}
    for t in targets:
        g = alike.get(id(t.pieces))
        if g is None:
            g = alike[id(t.pieces)] = (t.pieces, [])
        g[1].append(t)
    uses: dict[str, list[tuple[Piece, list[Target]]]] = defaultdict(list)
    for pieces, ts in alike.values():
        for p in pieces:
            if p.source is not None:
                uses[p.source].append((p, ts))

    writer_of_unit = {u.index: u.writer for u in units}

    def consumers(src: SourceTensor, covering: list[tuple[Piece, list[Target]]]):
        """(piece, bytes per row, targets, their writers) of each group of consumers placing the run alike,
        and the rank that writes the most of them (by bytes per row): computed once for all the runs a cut is
        split into."""
        if len(covering) == 1 and len(covering[0][1]) == 1:  # most runs (an expert's rows for one TP shard)
            p, (t,) = covering[0]
            w = writer_of_unit[t.unit]
            return [(p, _piece_bytes(src, p, (0, 1)), (t.index,), (w,))], w
        out, by_writer = [], {}
        for p, ts in covering:
            width = _piece_bytes(src, p, (0, 1))
            ws = tuple(writer_of_unit[t.unit] for t in ts)
            out.append((p, width, tuple(t.index for t in ts), ws))
            for w in ws:
                by_writer[w] = by_writer.get(w, 0) + width
        most = max(by_writer.values())
        return out, min(w for w, n in by_writer.items() if n == most)

    # Cut each source into row runs at every piece boundary (and at the size cap); a run's consumers
    # are then whole, so each run is read once and fanned out.
    runs: list[tuple[SourceTensor, tuple[int, int], tuple]] = []
    for name in sorted(uses, key=lambda n: (index[n].file, index[n].offset)):
        src = index[name]
        pieces = uses[name]
        if src.read_whole:  # a torch_dist chunk or a permuted slab: one read of the whole
            runs.append((src, (0, src.rows), consumers(src, pieces)))
            continue
        cuts = sorted({b for p, _ in pieces for b in p.rows})
        for lo, hi in zip(cuts, cuts[1:]):
            covering = [(p, t) for p, t in pieces if p.rows[0] <= lo and hi <= p.rows[1]]
            if not covering:
                continue
            group = consumers(src, covering)
            # A run sent to many files (dense weights duplicated across EP rank files) is cut finer, so
            # that the reader's send buffers, not just its read, fit in a bucket beside the read: by the
            # bytes each row really fans out to (a row-parallel piece carries only its columns).
            sent_per_row = sum(width * len(ts) for _, width, ts, _ in group[0])
            rows_cap = max(1, min(max_item_bytes // max(1, src.row_bytes), max_sent_bytes // max(1, sent_per_row)))
            for a in range(lo, hi, rows_cap):
                runs.append((src, (a, min(hi, a + rows_cap)), group))

    scales = [_scale_span(src, rows) for src, rows, _ in runs]
    planned = [_read_span(src, rows, scale) for (src, rows, _), scale in zip(runs, scales)]
    total = sum(span[2] for span in planned)
    biggest = max((span[2] for span in planned), default=0)
    cap = total / world + biggest
    load = [0] * world
    heap = [(0, r) for r in range(world)]
    items, fanouts = [], []
    for (src, rows, (group, pref)), (read_rows, offset, nbytes), scale in zip(runs, planned, scales):
        # Locality first: the rank that writes most of this run reads it, unless that breaks balance.
        if load[pref] + nbytes <= cap:
            reader = pref
        else:
            while True:  # lazy heap: skip stale entries
                l, r = heapq.heappop(heap)
                if l == load[r]:
                    break
            reader = r
        load[reader] += nbytes
        heapq.heappush(heap, (load[reader], reader))
        item = ReadItem(len(items), src.name, src.file, read_rows, offset, nbytes, reader, src.encoding, scale)
        items.append(item)
        whole = not src.read_whole  # a row run lies inside each consumer; a whole blob may not
        n = rows[1] - rows[0]
        for p, width, ts, ws in group:
            lo, hi = rows if whole else (max(rows[0], p.rows[0]), min(rows[1], p.rows[1]))
            fanouts.append(Fanout(len(fanouts), item.index, ts, ws, (lo, hi), p.cols, p.dst_row + lo - p.rows[0],
                                  (n if whole else hi - lo) * width, reader, p.dst_col))
    return items, fanouts
