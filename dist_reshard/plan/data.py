"""The plan's plain data: what every rank reads, sends, receives and writes, as tuples and dataclasses.

Every rank computes the same global `Plan` (it is deterministic in its inputs) and takes its own `RankPlan`
view, so no plan is ever communicated and the planner can be exercised for hundreds of simulated ranks in one
process.

Vocabulary:
- `Target`: one tensor (legacy) or one chunk of a global tensor (torch_dist) that a rank writes.
- `ReadItem`: a contiguous run of whole rows of one source tensor: one positional read, by one rank.
- `Transfer`: the part of a read item (rows x columns) that lands in one target, from reader to writer.
- `Fanout`: the same part of a read item landing alike in several targets (a dense shard's copies in the EP
  files of a legacy checkpoint): the plan holds one per group, a rank's view one `Transfer` per target.
- `Bucket`: the read items exchanged together; buckets bound the bytes a rank holds in flight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from ..config.layout import TargetLayout
from ..families.mapping import Piece
from ..formats.safetensors_index import DTYPE_SIZES


DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


DEFAULT_MAX_ITEM_BYTES = 64 * 1024 * 1024


# HF buffers that are recomputed at load time and have no Megatron counterpart.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WriteUnit:
    index: int
    path: str | None  # output file relative to the save folder (legacy); None for a torch_dist chunk
    writer: int
    nbytes: int


class Target(NamedTuple):  # a tuple: made once per tensor of every output file (440k in the 671B legacy plan)
    index: int
    unit: int
    container: str | None  # legacy state-dict container ("model", "model0", ...); None for torch_dist
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name of the output
    pieces: tuple[Piece, ...]  # dst_row in this target's dim 0
    global_shape: tuple[int, ...] | None = None  # torch_dist only
    global_offset: tuple[int, ...] | None = None  # torch_dist only
    lead: int = 0  # torch_dist: leading singleton axes (layer, expert) before the tensor's own dims
    # HF output of a fused expert tensor: planned as the per-expert tensors stacked, written as the file holds
    # it (`fused_experts.FusedTarget.stored_layout`).
    stored_layout: tuple | None = None
    shift: float = 0.0  # added to every value once the tensor is whole (`Rule.shift`; its negative on the way back)

    @property
    def rows(self) -> int:
        """Extent of the dim the pieces' dst_row indexes."""
        return self.shape[self.lead]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def padded(self) -> bool:
        return any(p.source is None for p in self.pieces)


class ReadItem(NamedTuple):  # a tuple, like Target
    index: int
    source: str
    file: str
    rows: tuple[int, int]
    offset: int  # absolute byte offset in `file`
    nbytes: int
    reader: int
    encoding: str | None = None  # see SourceTensor.encoding: bytes to decode after reading
    aux: tuple[str, int, int] | None = None  # (file, offset, nbytes) read after the rows: FP8 block scales

    @property
    def ranges(self) -> list[tuple[str, int, int]]:
        """The byte ranges this item reads, in buffer order; `nbytes` is their sum."""
        if self.aux is None:
            return [(self.file, self.offset, self.nbytes)]
        return [(self.file, self.offset, self.nbytes - self.aux[2]), self.aux]


@dataclass(frozen=True)
class Transfer:
    index: int  # the Fanout it belongs to
    item: int
    target: int
    rows: tuple[int, int]  # source rows (absolute in the source tensor)
    cols: tuple[int, int] | None
    dst_row: int  # first row in the target
    nbytes: int
    src: int
    dst: int
    dst_col: int = 0  # first column in the target (a row-parallel shard placed into a whole tensor)


class Fanout(NamedTuple):
    """Rows [rows) x cols of one read item placed alike (from dst_row, dst_col) into each of `targets`, written
    by `dsts`. A tuple: the 671B legacy plan holds half a million of these."""

    index: int
    item: int
    targets: tuple[int, ...]
    dsts: tuple[int, ...]  # the writer of each target
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    dst_row: int
    nbytes: int  # per target
    src: int
    dst_col: int = 0

    def transfers(self) -> list[Transfer]:
        return [Transfer(self.index, self.item, t, self.rows, self.cols, self.dst_row, self.nbytes, self.src, d,
                         self.dst_col) for t, d in zip(self.targets, self.dsts)]


@dataclass(frozen=True)
class Bucket:
    items: tuple[int, ...]
    fanouts: tuple[int, ...]


@dataclass
class RankPlan:
    """One rank's share of the plan: the only part that rank acts on."""

    rank: int
    units: list[WriteUnit]
    targets: list[Target]
    # Per bucket: items this rank reads, transfers it sends (by dst) and receives (by src), in wire order.
    reads: list[list[ReadItem]]
    sends: list[dict[int, list[Transfer]]]
    recvs: list[dict[int, list[Transfer]]]

    @property
    def bytes_read(self) -> int:
        return sum(i.nbytes for b in self.reads for i in b)

    @property
    def bytes_written(self) -> int:
        return sum(t.nbytes for t in self.targets)

    @property
    def bytes_sent(self) -> int:
        return sum(t.nbytes for b in self.sends for d, ts in b.items() if d != self.rank for t in ts)

    @property
    def bytes_received(self) -> int:
        return sum(t.nbytes for b in self.recvs for s, ts in b.items() if s != self.rank for t in ts)

    @property
    def peak_bucket_bytes(self) -> int:
        """Largest in-flight footprint: read buffer + send buffers + receive buffers of one bucket."""
        peak = 0
        for reads, sends, recvs in zip(self.reads, self.sends, self.recvs):
            n = sum(i.nbytes for i in reads)
            n += sum(t.nbytes for ts in sends.values() for t in ts)
            n += sum(t.nbytes for ts in recvs.values() for t in ts)
            peak = max(peak, n)
        return peak


@dataclass
class Plan:
    layout: TargetLayout
    world: int
    padded_vocab: int
    source_bytes: int  # bytes of the source tensors the conversion needs
    units: list[WriteUnit]
    targets: list[Target]
    items: list[ReadItem]
    fanouts: list[Fanout]
    buckets: list[Bucket]
    zeros_left_out: int = 0  # source tensors found all zero and left out (`source/zero_tensors.py`)
    _by_rank: dict | None = field(default=None, repr=False)

    @property
    def transfers(self) -> list[Transfer]:
        """Every transfer, one per (fanout, target): for inspecting small plans."""
        return [t for f in self.fanouts for t in f.transfers()]

    @property
    def transfer_count(self) -> int:
        return sum(len(f.targets) for f in self.fanouts)

    def rank_view(self, rank: int) -> RankPlan:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world {self.world}")
        units = [u for u in self.units if u.writer == rank]
        mine = {u.index for u in units}
        targets = [t for t in self.targets if t.unit in mine]
        reads, sends, recvs = [], [], []
        for b in self.buckets:
            reads.append([self.items[i] for i in b.items if self.items[i].reader == rank])
            s: dict[int, list[Transfer]] = defaultdict(list)
            r: dict[int, list[Transfer]] = defaultdict(list)
            for fi in b.fanouts:
                f = self.fanouts[fi]
                if f.src != rank and rank not in f.dsts:
                    continue
                for t in f.transfers():
                    if t.src == rank:
                        s[t.dst].append(t)
                    if t.dst == rank:
                        r[t.src].append(t)
            sends.append(dict(s))
            recvs.append(dict(r))
        return RankPlan(rank, units, targets, reads, sends, recvs)

    def accounting(self) -> list[dict]:
        """Per-rank bytes read / written / exchanged, without building every view's lists twice."""
        acc = [dict(rank=r, bytes_read=0, bytes_written=0, bytes_sent=0, bytes_received=0, peak_bucket_bytes=0,
                    resident_bytes=0)
               for r in range(self.world)]
        for it in self.items:
            acc[it.reader]["bytes_read"] += it.nbytes
        for u in self.units:
            acc[u.writer]["bytes_written"] += u.nbytes
        for b in self.buckets:
            inflight = [0] * self.world
            for i in b.items:
                inflight[self.items[i].reader] += self.items[i].nbytes
            for fi in b.fanouts:
                f = self.fanouts[fi]
                inflight[f.src] += f.nbytes * len(f.dsts)
                for d in f.dsts:
                    inflight[d] += f.nbytes
                    if d != f.src:
                        acc[f.src]["bytes_sent"] += f.nbytes
                        acc[d]["bytes_received"] += f.nbytes
            for r in range(self.world):
                acc[r]["peak_bucket_bytes"] = max(acc[r]["peak_bucket_bytes"], inflight[r])
        for a in acc:  # an upper bound: legacy and HF files are freed once written, torch_dist at the end
            a["resident_bytes"] = a["bytes_written"] + a["peak_bucket_bytes"]
        return acc

    @property
    def largest_item_bytes(self) -> int:
        return max((i.nbytes for i in self.items), default=0)
