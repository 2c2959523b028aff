"""The planner: from metadata alone, what every rank reads, sends, receives and writes.

Pure data in, plain data out: no I/O, no process group. Every rank computes the same global `Plan`
(it is deterministic in its inputs) and takes its own `RankPlan` view, so no plan is ever communicated
and the planner can be exercised for hundreds of simulated ranks in one process.

Vocabulary:
- `Target`: one tensor (legacy) or one chunk of a global tensor (torch_dist) that a rank writes.
- `ReadItem`: a contiguous run of whole rows of one source tensor: one positional read, by one rank.
- `Transfer`: the part of a read item (rows x columns) that lands in one target, from reader to writer.
- `Fanout`: the same part of a read item landing alike in several targets (a dense shard's copies in the EP
  files of a legacy checkpoint): the plan holds one per group, a rank's view one `Transfer` per target.
- `Bucket`: the read items exchanged together; buckets bound the bytes a rank holds in flight.
"""

from __future__ import annotations

import gc
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import ConversionError
from .hf_config import ModelConfig
from .layout import AUTO_MIN_CHUNK_BYTES, DTYPES, TargetLayout
from .mapping import Family, Kind, Piece, Rule, full_shape, hf_shapes, instances, mtp_layer, name_pattern
from .block_fp8 import scale_rows
from .fused_experts import fused_targets
from .safetensors_index import DTYPE_SIZES, SourceTensor

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


# ---------------------------------------------------------------------------------------------------
# Targets: what the output holds, as pieces of source tensors.


def _stray_expert(name: str, family: Family, cfg: ModelConfig) -> str | None:
    """Why an unmapped tensor is there, when it is an expert the config does not declare."""
    for rule in family.rules:
        if not rule.expert:
            continue
        for template in rule.hf:
            m = name_pattern(template).fullmatch(name)
            if m and int(m.group(1)) >= cfg.num_experts:
                return (f"expert {m.group(1)} exists but config.json declares {cfg.num_experts} experts "
                        f"(num_experts / num_local_experts)")
    return None


def _mtp_layer(name: str, cfg: ModelConfig) -> str | None:
    layer = mtp_layer(name, cfg)
    if layer is None:
        return None
    return (f"layer {layer} is past num_hidden_layers = {cfg.num_layers}: a multi-token-prediction "
            f"layer, which dist_reshard does not convert; pass --drop-mtp to convert without it")


def _resolve_rules(family: Family, index: dict[str, SourceTensor], cfg: ModelConfig) -> list[Rule]:
    """The family's rules that apply to this checkpoint, with every source tensor accounted for."""
    rules, used = [], set()
    for rule in family.rules:
        if rule.tied_to and cfg.tie_word_embeddings:
            rules.append(rule)
            continue
        sets = instances(rule, cfg)
        present = [all(n in index for n in rule.hf_names(i, e, cfg)) for i, e in sets]
        if not sets or (rule.optional and not any(present)):
            continue
        for (i, e), ok in zip(sets, present):
            if not ok:
                missing = next(n for n in rule.hf_names(i, e, cfg) if n not in index)
                why = f"; config.json declares {cfg.num_experts} experts" if rule.expert else ""
                raise ConversionError(f"source tensor {missing!r} is missing from the safetensors files "
                                      f"(needed for {rule.megatron.format(i=i, e=e)}{why})")
            used.update(rule.hf_names(i, e, cfg))
        rules.append(rule)
    unknown = sorted(n for n in index if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings:  # some tied checkpoints still store a copy of the head
        tied = {n for r in family.rules if r.tied_to for n in r.hf}
        unknown = [n for n in unknown if n not in tied]
    if unknown:
        why = _stray_expert(unknown[0], family, cfg) or _mtp_layer(unknown[0], cfg) or (
            f"not mapped by the {family.name} family ({len(unknown)} unmapped tensors); refusing to drop it")
        raise ConversionError(f"{index[unknown[0]].file}: tensor {unknown[0]!r}: {why}")
    return rules


def _check_shapes(rule: Rule, names: tuple[str, ...], index: dict[str, SourceTensor], cfg: ModelConfig) -> None:
    """Shapes the config implies, so a mismatched config cannot produce a silently wrong checkpoint."""
    for n, shape in zip(names, hf_shapes(rule, cfg)):
        if index[n].shape != shape:
            raise ConversionError(f"{index[n].file}: tensor {n!r} has shape {list(index[n].shape)}, "
                                  f"config.json implies {list(shape)}")


def _output_dtype(layout: TargetLayout, parts: list[SourceTensor], rule: Rule | None = None) -> str:
    """The dtype one output tensor is written in. Its HF parts (a fused QKV's q, k, v) must agree unless
    --dtype says what to write: otherwise one of them would be cast silently (or bytes mixed)."""
    keep = rule is not None and rule.keep_dtype
    if (keep or not layout.dtype) and len({p.dtype for p in parts}) > 1:
        raise ConversionError(f"{parts[0].file}: the parts of one output tensor differ in dtype ("
                              + ", ".join(f"{p.name} {p.dtype}" for p in parts) + ")"
                              + ("" if keep else "; pass --dtype to say which dtype to write"))
    return DTYPES[layout.dtype] if layout.dtype and not keep else parts[0].dtype


def _row_slices(offset: tuple, shape: tuple, pieces: tuple[Piece, ...], row_bytes: int,
                max_bytes: int) -> list[tuple[tuple, tuple, tuple[Piece, ...]]]:
    """A block cut along dim 0 into parts of at most `max_bytes` (whole rows): (offset, shape, pieces)."""
    step = max(1, max_bytes // max(1, row_bytes))
    if shape[0] <= step:
        return [(offset, shape, pieces)]
    out = []
    for a in range(0, shape[0], step):
        z = min(shape[0], a + step)
        part = []
        for p in pieces:
            lo, hi = max(a, p.dst_row), min(z, p.dst_row + p.rows[1] - p.rows[0])
            if lo < hi:
                first = p.rows[0] + lo - p.dst_row
                part.append(Piece(p.source, (first, first + hi - lo), p.cols, lo - a, p.dst_col))
        out.append(((offset[0] + a,) + offset[1:], (z - a,) + shape[1:], tuple(part)))
    return out


def _build_targets(family: Family, index: dict[str, SourceTensor], cfg: ModelConfig,
                   layout: TargetLayout, padded_vocab: int, max_chunk_bytes: int,
                   from_hf: bool = True) -> list[tuple[tuple, Target]]:
    """(unit key, target) pairs; unit keys group targets into output files or DCP chunks.

    Legacy unit keys are (tp, pp, ep) rank files: every file of an EP group holds the same dense TP shard
    and its own experts, renumbered from 0. torch_dist unit keys are chunks of global tensors.
    """
    rules = _resolve_rules(family, index, cfg)
    placement = layout.layer_placement(cfg.num_layers)
    by_name = {r.megatron: r for r in rules}
    legacy = layout.ckpt_format == "torch"
    impl = layout.transformer_impl
    stacked = cfg.layers_alike
    experts_per_rank = cfg.num_experts // layout.ep if cfg.num_experts else 0
    out: list[tuple[tuple, Target]] = []

    # A rule's shard geometry depends on its HF shapes and the TP rank, not on which layer or expert it is:
    # computed once per (rule, shapes, tp, rank) and given each instance's names (a 671B legacy plan has
    # 237k expert shards of a handful of geometries).
    geometry: dict[tuple, tuple] = {}

    def add_legacy(unit_keys, container, key, rule, names, tp, tp_rank):
        """One rank file's tensor, the same in every file of `unit_keys` (a dense shard's EP copies)."""
        shapes = tuple(index[n].shape for n in names)
        geo = geometry.get((id(rule), shapes, tp, tp_rank))
        if geo is None:
            blks = rule.blocks(impl, list(shapes), names, cfg, tp, tp_rank, padded_vocab)
            slot = {n: k for k, n in enumerate(names)}
            template, row = [], 0
            for b in blks:
                template.extend((slot.get(p.source), p.rows, p.cols, p.dst_row + row) for p in b.pieces)
                row += b.shape[0]
            shape = (1,) * rule.unsqueeze + (row,) + blks[0].shape[1:]
            geo = geometry[(id(rule), shapes, tp, tp_rank)] = (shape, template)
        shape, template = geo
        pieces = tuple(Piece(None if k is None else names[k], rows, cols, dst_row)
                       for k, rows, cols, dst_row in template)
        dtype = _output_dtype(layout, [index[n] for n in names], rule)
        target = Target(-1, -1, container, key, shape, dtype, pieces,
                        lead=rule.unsqueeze, shift=rule.shift if from_hf else 0.0)
        out.extend((unit_key, target) for unit_key in unit_keys)

    def add_dist(key, lead_offset, lead_shape, rule, names, tp):
        shapes = [index[n].shape for n in names]
        kind = rule.kind_for(impl)
        full = full_shape(kind, shapes, padded_vocab)
        lead_offset, lead_shape = lead_offset + (0,) * rule.unsqueeze, lead_shape + (1,) * rule.unsqueeze
        sections = rule.dist_sections(key, full, cfg)
        ones = (1,) * len(lead_offset)
        dtype = _output_dtype(layout, [index[n] for n in names], rule)
        # torch_dist chunks need not follow the TP split (Megatron reshards on load). Writing a small tensor
        # as one chunk keeps MoE models' tens of thousands of expert tensors from each becoming TP x 2
        # chunks, read items and transfers; large tensors keep TP chunks, which bound what one writer holds.
        if kind is Kind.REPLICATED or math.prod(full) * DTYPE_SIZES[dtype] <= layout.whole_chunk_bytes:
            tp = 1
        for r in range(tp):
            for b in rule.blocks(impl, shapes, names, cfg, tp, r, padded_vocab):
                # A block lies within one section (key); its offset becomes relative to that section.
                k, first, sub_full = next(s for s in sections if s[1] <= b.offset[0] < s[1] + s[2][0])
                row_bytes = math.prod(b.shape[1:]) * DTYPE_SIZES[dtype]
                # Large chunks cut along dim 0 (Megatron reads any chunking back): what each rank holds
                # and writes is then within a small fraction of 1/N, not within one TP shard.
                for offset, shape, pieces in _row_slices(b.offset, b.shape, b.pieces, row_bytes, max_chunk_bytes):
                    goff = lead_offset + (offset[0] - first,) + offset[1:]
                    out.append(((k, goff), Target(-1, -1, None, k, ones + shape, dtype, pieces,
                                                  lead_shape + sub_full, goff, len(lead_offset),
                                                  shift=rule.shift if from_hf else 0.0)))

    for rule in rules:
        if rule.tied_to and cfg.tie_word_embeddings:
            if not legacy or layout.pp == 1:
                continue  # tied and on the same stage (or torch_dist, which keys it as the embedding)
            hf_rule = by_name[rule.tied_to]
        else:
            hf_rule = rule
        tp = layout.expert_tp if rule.expert else layout.tp
        for i, e in instances(rule, cfg):
            names = hf_rule.hf_names(i, e, cfg)
            _check_shapes(hf_rule, names, index, cfg)
            p, v, j = layout.place(rule, i, placement)
            if legacy:
                container = layout.container(v)
                if e is None:
                    key = rule.name(impl).format(i=j)
                    for r in range(layout.tp):
                        add_legacy([(r, p, ep_rank) for ep_rank in range(layout.ep)], container, key, rule, names,
                                   tp, r)
                else:
                    ep_rank, local = divmod(e, experts_per_rank)
                    key = rule.name(impl, layout.moe_grouped_gemm).format(i=j, e=local)
                    for r in range(layout.tp):
                        # etp divides tp here (validated), so TP rank r holds expert-TP shard r % etp.
                        add_legacy([(r, p, ep_rank)], container, key, rule, names, tp, r % tp)
            else:
                if i is None:
                    add_dist(rule.torch_dist_key(impl), (), (), rule, names, tp)
                elif stacked:
                    layers = rule.config(cfg).num_layers
                    lead = ((i, e), (layers, cfg.num_experts)) if e is not None else ((i,), (layers,))
                    add_dist(rule.torch_dist_key(impl), *lead, rule, names, tp)
                else:
                    lead = ((e,), (cfg.num_experts,)) if e is not None else ((), ())
                    add_dist(rule.torch_dist_key(impl, layer=i), *lead, rule, names, tp)
    return out


def _assign_writers(unit_bytes: list[int], world: int, order: list[int] | None = None) -> list[int]:
    """Contiguous runs of units, in locality order, of about 1/N of the bytes each (a unit goes to the
    rank its midpoint falls in). Units that share source bytes sit next to each other in that order (the
    TP shards and EP copies of one pipeline stage, the chunks of one layer), so one rank writes them and
    reads their source once without sending it anywhere. Balanced to within one unit."""
    order = list(range(len(unit_bytes))) if order is None else order
    total = sum(unit_bytes) or 1
    writer = [0] * len(unit_bytes)
    done = 0
    for u in order:
        writer[u] = min(world - 1, int((done + unit_bytes[u] / 2) * world / total))
        done += unit_bytes[u]
    return writer


def _locality_key(key: tuple, target: Target, num_layers: int) -> tuple:
    """Sort key putting units that read the same source bytes side by side."""
    if target.container is not None:  # legacy file (tp, pp, ep): a stage's TP shards, then its EP copies
        tp, pp, ep = key
        return (pp, tp, ep)
    if target.global_offset is None:  # HF output file: already in state-dict order
        return key
    if target.lead:  # torch_dist chunk of a layer: the layer's chunks together
        return (target.global_offset[0], target.key, target.global_offset)
    layer = int(target.key.split(".")[2]) if target.key.startswith("decoder.layers.") and \
        target.key.split(".")[2].isdigit() else (-1 if target.key.startswith("embedding") else num_layers)
    return (layer, target.key, target.global_offset)


# ---------------------------------------------------------------------------------------------------
# Reads and transfers.


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


def _plan_reads(targets: list[Target], units: list[WriteUnit], index: dict[str, SourceTensor], world: int,
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


def _plan_buckets(items: list[ReadItem], fanouts: list[Fanout], world: int, bucket_bytes: int) -> list[Bucket]:
    """Round-robin over readers so every rank reads in every bucket, within per-rank byte bounds.

    A rank whose next item does not fit is done for this bucket (in-flight bytes only grow), so each
    bucket costs one pass over the ranks still reading plus its items.
    """
    # _plan_reads makes each item's fanouts in item order: item i's are fanouts[first[i]:first[i + 1]].
    first = [0] * (len(items) + 1)
    for f in fanouts:
        first[f.item + 1] += 1
    for i in range(len(items)):
        first[i + 1] += first[i]
    need: list[tuple[tuple[int, int], ...]] = []  # (rank, bytes) an item puts in flight: its read, sends, receives
    for it in items:
        n = {it.reader: it.nbytes}
        for f in fanouts[first[it.index]:first[it.index + 1]]:
            n[f.src] = n.get(f.src, 0) + f.nbytes * len(f.dsts)
            for d in f.dsts:
                n[d] = n.get(d, 0) + f.nbytes
        need.append(tuple(n.items()))
    queues = [[] for _ in range(world)]
    for it in items:
        queues[it.reader].append(it.index)
    heads = [0] * world
    active = [r for r in range(world) if queues[r]]
    buckets = []
    while active:
        inflight = [0] * world
        chosen: list[int] = []
        open_ranks = list(active)
        while open_ranks:
            still_open = []
            for r in open_ranks:
                i = queues[r][heads[r]]
                fits = True
                if chosen:
                    for q, n in need[i]:
                        if inflight[q] + n > bucket_bytes:
                            fits = False
                            break
                if not fits:
                    continue
                for q, n in need[i]:
                    inflight[q] += n
                chosen.append(i)
                heads[r] += 1
                if heads[r] < len(queues[r]):
                    still_open.append(r)
            open_ranks = still_open
        active = [r for r in active if heads[r] < len(queues[r])]
        chosen.sort()
        buckets.append(Bucket(tuple(chosen), tuple(f for i in chosen for f in range(first[i], first[i + 1]))))
    return buckets


def _translate(pieces: tuple[Piece, ...], covers: dict, logical: dict[str, SourceTensor]) -> tuple[Piece, ...]:
    """Resolve pieces of HF tensors into pieces of the stored tensors (Megatron shards or chunks) that hold
    those elements: each piece is intersected with every cover of its HF tensor."""
    out = []
    for p in pieces:
        if p.source is None:
            out.append(p)
            continue
        shape = logical[p.source].shape
        width = shape[1] if len(shape) > 1 else None
        want_cols = p.cols or ((0, width) if width else None)
        for c in covers.get(p.source, ()):
            lo, hi = max(p.rows[0], c.rows[0]), min(p.rows[1], c.rows[1])
            if lo >= hi:
                continue
            src_cols, dst_col = None, p.dst_col
            if width is not None:
                have = c.cols or (0, width)
                c0, c1 = max(want_cols[0], have[0]), min(want_cols[1], have[1])
                if c0 >= c1:
                    continue
                if (c0, c1) != have:
                    src_cols = (c0 - have[0], c1 - have[0])
                dst_col = p.dst_col + c0 - want_cols[0]
            out.append(Piece(c.stored, (c.stored_row + lo - c.rows[0], c.stored_row + hi - c.rows[0]), src_cols,
                             p.dst_row + lo - p.rows[0], dst_col))
    return tuple(out)


def hf_file_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [
        f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _hf_order(name: str) -> tuple:
    """transformers' state-dict order: embeddings, layers by index, final norm, head."""
    for prefix in ("model.layers.", "backbone.layers."):  # Mamba-2 / Nemotron-H name their model `backbone`
        if name.startswith(prefix):
            layer, rest = name[len(prefix):].split(".", 1)
            return (1, int(layer), rest)
    return (0 if "embed" in name else 2 if name.startswith("model.") else 3, 0, name)


def kept_dtypes(family: Family, cfg: ModelConfig) -> set[str]:
    """HF tensors whose dtype no --dtype changes (`Rule.keep_dtype`)."""
    return {n for r in family.rules if r.keep_dtype for i, e in instances(r, cfg) for n in r.hf_names(i, e, cfg)}


def shifted(family: Family, cfg: ModelConfig) -> dict[str, float]:
    """HF tensors whose values Megatron holds shifted (`Rule.shift`), by the shift."""
    return {n: r.shift for r in family.rules if r.shift for i, e in instances(r, cfg) for n in r.hf_names(i, e, cfg)}


def build_hf_targets(logical: dict[str, SourceTensor], cfg: ModelConfig, layout,
                     kept: set[str] = frozenset(), fused: tuple = (),
                     shifts: dict[str, float] | None = None) -> tuple[list, list[str]]:
    """HF tensors in state-dict order, packed into shard files of at most max_shard_bytes (a tensor larger
    than that gets a file of its own), as save_pretrained does. Per-expert tensors of a family's fused
    expert tensors (`fused`, see fused_experts.py) are written as the fused tensors."""
    stacks = {f.name: f for f in fused_targets(logical, fused, cfg)} if fused else {}
    stacked = {n for f in stacks.values() for n in f.experts}
    names = sorted([n for n in logical if n not in stacked] + list(stacks), key=_hf_order)
    files: list[list] = [[]]
    size = 0
    for n in names:
        if n in stacks:
            f = stacks[n]
            t = logical[f.experts[0]]
            per = t.rows
            pieces = tuple(Piece(e, (0, per), None, k * per) for k, e in enumerate(f.experts))
            shape, layout_kw = f.shape, dict(stored_layout=f.stored_layout)
        else:
            t = logical[n]
            pieces, shape, layout_kw = (Piece(n, (0, t.rows), None, 0),), t.shape, {}
        dtype = DTYPES[layout.dtype] if layout.dtype and n not in kept else t.dtype
        target = Target(-1, -1, None, n, shape, dtype, pieces, **layout_kw, shift=-(shifts or {}).get(n, 0.0))
        if files[-1] and size + target.nbytes > layout.max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(target)
        size += target.nbytes
    paths = hf_file_names(len(files))
    return [((k,), t) for k, ts in enumerate(files) for t in ts], paths


def make_plan(family: Family, index: dict[str, SourceTensor], cfg: ModelConfig, layout,
              world: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
              max_item_bytes: int | None = None, skip_paths: frozenset = frozenset(), source=None) -> Plan:
    """The whole job's plan; identical on every rank for identical inputs.

    `index` holds the HF tensors. With a Megatron `source` (megatron_source.MegatronSource) they are its
    logical tensors and the plan reads the stored shards or chunks that hold them instead. `layout` is a
    TargetLayout (Megatron output) or an HFLayout (safetensors output).
    `skip_paths` names output files already written (a resumed job): their targets are left out, so
    nothing is read or sent for them.
    """
    # The plan is millions of small acyclic tuples made in one go; the cyclic collector would rescan all of
    # them again and again while they are made (half the 671B legacy plan's time), and has nothing to free.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _make_plan(family, index, cfg, layout, world, bucket_bytes, max_item_bytes, skip_paths, source)
    finally:
        if collecting:
            gc.enable()


def _make_plan(family, index, cfg, layout, world, bucket_bytes, max_item_bytes, skip_paths, source) -> Plan:
    if world < 1:
        raise ConversionError(f"world size {world}: must be at least 1")
    layout.validate(cfg)
    family.check(cfg)
    if layout.ckpt_format != "hf":
        family.check_layout(layout, cfg)
    padded_vocab = layout.padded_vocab(cfg.vocab_size)
    if layout.ckpt_format == "hf":
        pairs, hf_paths = build_hf_targets(index, cfg, layout, kept_dtypes(family, cfg), family.fused,
                                           shifted(family, cfg))
        path_of = lambda key: hf_paths[key[0]]  # noqa: E731
    else:
        max_chunk = layout.max_chunk_bytes or max(
            AUTO_MIN_CHUNK_BYTES, sum(t.data_bytes for t in index.values()) // (16 * world))
        pairs = _build_targets(family, index, cfg, layout, padded_vocab, max_chunk, from_hf=source is None)
        path_of = (lambda key: layout.legacy_file(*key)) if layout.ckpt_format == "torch" else (lambda key: None)
    if skip_paths:
        pairs = [(k, t) for k, t in pairs if path_of(k) not in skip_paths]
    if source is not None:
        pairs = [(k, t._replace(pieces=_translate(t.pieces, source.covers, index))) for k, t in pairs]
        index = source.stored

    unit_keys: dict[tuple, int] = {}
    for key, _ in pairs:
        unit_keys.setdefault(key, len(unit_keys))
    unit_bytes = [0] * len(unit_keys)
    targets = []
    sizes: dict[int, int] = {}  # by id: a legacy dense target is one object for its 32 EP copies
    for key, t in pairs:
        u = unit_keys[key]
        nbytes = sizes.get(id(t))
        if nbytes is None:
            nbytes = sizes[id(t)] = t.nbytes
        unit_bytes[u] += nbytes
        targets.append(Target(len(targets), u, t.container, t.key, t.shape, t.dtype, t.pieces, t.global_shape,
                              t.global_offset, t.lead, t.stored_layout, t.shift))  # not _replace: once per target
    first_target: dict[int, Target] = {}
    for t in targets:
        first_target.setdefault(t.unit, t)
    keys = {u: k for k, u in unit_keys.items()}
    order = sorted(range(len(unit_keys)), key=lambda u: (_locality_key(keys[u], first_target[u], cfg.num_layers), u))
    writers = _assign_writers(unit_bytes, world, order)
    paths: list[str | None] = [None] * len(unit_keys)
    for key, u in unit_keys.items():
        paths[u] = path_of(key)
    units = [WriteUnit(u, paths[u], writers[u], unit_bytes[u]) for u in range(len(unit_keys))]

    if max_item_bytes is None:
        # Small enough that reads balance to a few percent of 1/N, large enough for efficient reads.
        needed = sum(index[n].nbytes for n in {p.source for t in targets for p in t.pieces if p.source})
        max_item_bytes = min(DEFAULT_MAX_ITEM_BYTES, max(1 << 20, needed // (16 * world)))
    # An item's sends may fill what a bucket leaves beside its read: fewer, larger transfers for runs fanned
    # out to many files (the 671B legacy plan at TP8 x EP32: 4.8M transfers with sends capped at the item size).
    max_sent_bytes = max(max_item_bytes, bucket_bytes - max_item_bytes)
    items, fanouts = _plan_reads(targets, units, index, world, max_item_bytes, max_sent_bytes)
    buckets = _plan_buckets(items, fanouts, world, bucket_bytes)
    source_bytes = sum(i.nbytes for i in items)
    return Plan(layout, world, padded_vocab, source_bytes, units, targets, items, fanouts, buckets)
