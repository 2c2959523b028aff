"""The planner: from metadata alone, the whole job's `Plan` (targets, writers, reads, buckets).

Pure data in, plain data out: no I/O, no process group.
"""

from __future__ import annotations

import gc

from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig
from ..config.layout import AUTO_MIN_CHUNK_BYTES
from ..families.mapping import Family
from ..formats.safetensors_index import SourceTensor
from ..source import zero_tensors
from .data import DEFAULT_BUCKET_BYTES, DEFAULT_MAX_ITEM_BYTES, Plan, Target, WriteUnit
from .targets import build_hf_targets, build_targets, kept_dtypes, shifted, translate_pieces
from .reads import plan_reads
from .buckets import plan_buckets


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
    zeros = set(zero_tensors.names(family, cfg))
    # An HF source's zero tensors were checked when it was opened; a Megatron source stores none.
    zeros_left_out = len(zeros & index.keys()) if source is None else 0
    padded_vocab = layout.padded_vocab(cfg.vocab_size)
    if layout.ckpt_format == "hf":
        pairs, hf_paths = build_hf_targets(index, cfg, layout, kept_dtypes(family, cfg), family.fused, zeros,
                                           shifted(family, cfg))
        path_of = lambda key: hf_paths[key[0]]  # noqa: E731
    else:
        max_chunk = layout.max_chunk_bytes or max(
            AUTO_MIN_CHUNK_BYTES, sum(t.data_bytes for t in index.values()) // (16 * world))
        pairs = build_targets(family, index, cfg, layout, padded_vocab, max_chunk, from_hf=source is None)
        path_of = (lambda key: layout.legacy_file(*key)) if layout.ckpt_format == "torch" else (lambda key: None)
    if skip_paths:
        pairs = [(k, t) for k, t in pairs if path_of(k) not in skip_paths]
    if source is not None:
        pairs = [(k, t._replace(pieces=translate_pieces(t.pieces, source.covers, index))) for k, t in pairs]
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
    items, fanouts = plan_reads(targets, units, index, world, max_item_bytes, max_sent_bytes)
    buckets = plan_buckets(items, fanouts, world, bucket_bytes)
    source_bytes = sum(i.nbytes for i in items)
    return Plan(layout, world, padded_vocab, source_bytes, units, targets, items, fanouts, buckets, zeros_left_out)
