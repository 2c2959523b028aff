"""Targets: what the output holds (a rank file's tensors, a torch_dist chunk, an HF file's tensors), each as
pieces of source tensors, and which source tensors a family's rules account for."""

from __future__ import annotations

import math
import re

from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig
from ..config.layout import DTYPES, TargetLayout
from ..families.mapping import Family, Kind, Piece, Rule, full_shape, hf_shapes, instances, mtp_layer, name_pattern
from ..families.fused_experts import fused_targets
from ..source import zero_tensors
from ..formats.safetensors_index import DTYPE_SIZES, SourceTensor
from .data import IGNORED_SUFFIXES, Target


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


def _mtp_layer(name: str, cfg: ModelConfig, family: Family) -> str | None:
    layer = mtp_layer(name, cfg)
    if layer is None:
        if family.unconverted_mtp and re.search(family.unconverted_mtp, name):
            return (f"a multi-token-prediction tensor of the {family.name} family, which dist_reshard does not "
                    f"convert (transformers does not load it either); pass --drop-mtp to convert without it")
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
        if not rule.shared_with:  # an MTP layer's copy of a shared tensor: checked against it, not converted
            rules.append(rule)
    used.update(zero_tensors.names(family, cfg))  # checked all zero when the source was opened
    unknown = sorted(n for n in index if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings:  # some tied checkpoints still store a copy of the head
        tied = {n for r in family.rules if r.tied_to for n in r.hf}
        unknown = [n for n in unknown if n not in tied]
    if unknown:
        why = _stray_expert(unknown[0], family, cfg) or _mtp_layer(unknown[0], cfg, family) or (
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


def build_targets(family: Family, index: dict[str, SourceTensor], cfg: ModelConfig,
                  layout: TargetLayout, padded_vocab: int, max_chunk_bytes: int,
                  from_hf: bool = True) -> list[tuple[tuple, Target]]:
    """(unit key, target) pairs; unit keys group targets into output files or DCP chunks.

    Legacy unit keys are (tp, pp, ep) rank files: every file of an EP group holds the same dense TP shard
    and its own experts, renumbered from 0. torch_dist unit keys are chunks of global tensors.
    """
    rules = _resolve_rules(family, index, cfg)
    placement = layout.layer_placement(cfg.num_layers)
    by_name = {r.megatron: r for r in rules if r.home != "mtp"}
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
        if rule.home == "mtp" and not (legacy and layout.mtp_stage() != (0, 0)):
            continue  # the MTP stage's embedding: its own copy only in a legacy file of another stage
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
                elif stacked and not rule.mtp:
                    layers = rule.config(cfg).num_layers
                    lead = ((i, e), (layers, cfg.num_experts)) if e is not None else ((i,), (layers,))
                    add_dist(rule.torch_dist_key(impl), *lead, rule, names, tp)
                else:
                    lead = ((e,), (cfg.num_experts,)) if e is not None else ((), ())
                    add_dist(rule.torch_dist_key(impl, layer=i), *lead, rule, names, tp)
    return out


def translate_pieces(pieces: tuple[Piece, ...], covers: dict, logical: dict[str, SourceTensor]) -> tuple[Piece, ...]:
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
                     kept: set[str] = frozenset(), fused: tuple = (), zeros=frozenset(),
                     shifts: dict[str, float] | None = None) -> tuple[list, list[str]]:
    """HF tensors in state-dict order, packed into shard files of at most max_shard_bytes (a tensor larger
    than that gets a file of its own), as save_pretrained does. Per-expert tensors of a family's fused
    expert tensors (`fused`, see fused_experts.py) are written as the fused tensors; `zeros` (no Megatron
    counterpart, see source/zero_tensors.py) as zeros."""
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
            pieces, shape, layout_kw = (Piece(None if n in zeros else n, (0, t.rows), None, 0),), t.shape, {}
        dtype = DTYPES[layout.dtype] if layout.dtype and n not in kept and n not in zeros else t.dtype
        target = Target(-1, -1, None, n, shape, dtype, pieces, **layout_kw, shift=-(shifts or {}).get(n, 0.0))
        if files[-1] and size + target.nbytes > layout.max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(target)
        size += target.nbytes
    paths = hf_file_names(len(files))
    return [((k,), t) for k, ts in enumerate(files) for t in ts], paths
