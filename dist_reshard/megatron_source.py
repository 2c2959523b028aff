"""A Megatron-Core checkpoint as a conversion source: where each part of each HF tensor is stored.

Metadata only, like the safetensors index: a legacy `model_optim_rng.pt` is a zip of uncompressed
records, so its pickle gives every tensor's record, shape and dtype and the zip headers give the record's
byte offset; each shard tensor becomes a `SourceTensor` read with positional reads like a safetensors
tensor. A torch_dist chunk is a `torch.save` blob inside a `.distcp` file (DCP's metadata gives its byte
range); it is read whole and decoded. The family table, through `blocks()`, says which rows and columns
of which HF tensor each stored shard or chunk holds (`Cover`s); the planner intersects those with what
each output needs, so every byte is read once, by one rank, whatever the two layouts.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from argparse import Namespace
from collections import defaultdict
from dataclasses import dataclass

from . import legacy_gpt
from .dtypes import DTYPE_NAMES
from .errors import ConversionError
from .families import family_for
from .hf_config import HYBRID_MODEL_TYPES, ModelConfig, config_from_dict
from .layout import TargetLayout
from .mapping import Family, Kind, full_shape, hf_shapes, instances, name_pattern
from .safe_pickle import TensorRef, read_dcp_metadata, read_pt_metadata
from .safetensors_index import DTYPE_SIZES, SourceTensor

@dataclass(frozen=True)
class Cover:
    """HF tensor `hf` rows [rows) x cols [cols) (None: all) are stored in `stored` from row `stored_row`,
    columns from 0."""

    hf: str
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    stored: str
    stored_row: int


@dataclass
class MegatronSource:
    path: str
    format: str  # "torch" | "torch_dist" | "legacy_gpt" (torch files under pre-Megatron-Core names)
    args: Namespace
    config: ModelConfig
    family: Family
    layout: TargetLayout  # the layout the checkpoint was written in
    stored: dict[str, SourceTensor]  # readable tensors (shards or chunks) by stored name
    covers: dict[str, list[Cover]]  # HF name -> where its parts are stored
    logical: dict[str, SourceTensor]  # HF name -> shape and dtype (no file): what the planner converts
    files: list[str]


# ---------------------------------------------------------------------------------------------------
# The checkpoint's own facts.


def iteration_dir(path: str) -> str:
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.exists(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            return os.path.join(path, "release")
        if not text.isdigit():
            raise ConversionError(f"{tracker}: holds {text!r}, not an iteration number")
        folder = os.path.join(path, f"iter_{int(text):07d}")
        if not os.path.isdir(folder):
            raise ConversionError(f"{tracker}: names iteration {int(text)} but {folder} does not exist")
        return folder
    if os.path.exists(os.path.join(path, "metadata.json")) or glob.glob(os.path.join(path, "mp_rank_*")):
        return path
    iters = sorted(glob.glob(os.path.join(path, "iter_*")))
    if len(iters) == 1:
        return iters[0]
    if iters:
        raise ConversionError(f"{path}: several iterations ({', '.join(os.path.basename(i) for i in iters)}) and "
                              f"no latest_checkpointed_iteration.txt saying which to read")
    raise ConversionError(f"{path}: not a Megatron checkpoint (no latest_checkpointed_iteration.txt, iter_* "
                          f"folder, metadata.json or mp_rank_* files)")


def _config_from_args(args: Namespace) -> ModelConfig:
    """The HF config an HF -> Megatron conversion stored in the args, else one rebuilt from Megatron's flags."""
    stored = getattr(args, "hf_config", None)
    pattern = getattr(args, "hybrid_override_pattern", None)
    stored_gpt = isinstance(stored, dict) and stored.get("architectures") and \
        stored.get("model_type") not in HYBRID_MODEL_TYPES
    if pattern and set(pattern) <= {"*", "-"} and (getattr(args, "swiglu", False) or stored_gpt):
        # A GPT model laid out as a MambaModel: read as the GPT model, then placed by the pattern.
        from .families.gpt_hybrid import gpt_layers_as_hybrid

        gpt = Namespace(**dict(vars(args), num_layers=pattern.count("*"), hybrid_override_pattern=None))
        return gpt_layers_as_hybrid(_config_from_args(gpt), pattern, "args.hybrid_override_pattern")
    if isinstance(stored, dict) and stored.get("architectures"):
        try:
            cfg = config_from_dict(stored, "args.hf_config")
        except ConversionError:
            cfg = None
        # Only while the args still describe that model: the args are what Megatron itself goes by.
        if cfg is not None and (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads,
                                cfg.ffn_hidden_size, cfg.num_experts, cfg.moe_ffn_hidden_size) == (
                getattr(args, "hf_architecture", None), args.num_layers, args.hidden_size, args.num_attention_heads,
                args.ffn_hidden_size, getattr(args, "num_experts", None) or 0,
                (getattr(args, "moe_ffn_hidden_size", None) or 0) if cfg.num_experts else 0):
            return cfg
    if getattr(args, "vision_model_type", None):  # a LLaVAModel checkpoint
        from .llava_config import llava_config_from_args

        return llava_config_from_args(args, "args")
    arch = getattr(args, "hf_architecture", None)
    if not arch:  # a checkpoint from another tool: the features decide the closest dense family
        arch = ("Qwen3ForCausalLM" if getattr(args, "qk_layernorm", False) else
                "Qwen2ForCausalLM" if getattr(args, "add_qkv_bias", False) else "LlamaForCausalLM")
    heads = args.num_attention_heads
    experts = getattr(args, "num_experts", None) or 0
    layer_fields = {}  # what the layers hold beyond a dense GPT's: experts, or a hybrid's mamba mixers
    if experts:
        freq = getattr(args, "moe_layer_freq", 1)
        moe_layers = [bool(x) for x in freq] if isinstance(freq, list) else [i % freq == 0
                                                                             for i in range(args.num_layers)]
        layer_fields = dict(num_experts=experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                            moe_topk=args.moe_router_topk,
                            shared_expert_ffn_hidden_size=getattr(args, "moe_shared_expert_intermediate_size", None) or 0,
                            norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False),
                            moe_layers=tuple(moe_layers))
    if pattern:  # a MambaModel: Nemotron-H if it has attention or MLP layers, else Mamba-2
        arch = getattr(args, "hf_architecture", None) or (
            "Mamba2ForCausalLM" if set(pattern) == {"M"} else "NemotronHForCausalLM")
        layer_fields = dict(
            layer_kinds=tuple(pattern), mamba_state_dim=args.mamba_state_dim, mamba_head_dim=args.mamba_head_dim,
            mamba_num_groups=args.mamba_num_groups,
            mamba_num_heads=getattr(args, "mamba_num_heads", None) or 2 * args.hidden_size // args.mamba_head_dim,
            mamba_conv_kernel=getattr(args, "mamba_conv_kernel", None) or 4,
            squared_relu=bool(getattr(args, "squared_relu", False)))
    return ModelConfig(
        architecture=arch, model_type=getattr(args, "hf_model_type", ""), num_layers=args.num_layers,
        hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=heads,
        # Megatron-LM reads --num-query-groups (default 1) only with --group-query-attention.
        num_query_groups=(getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", True)
                          else None) or heads,
        kv_channels=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        vocab_size=getattr(args, "true_vocab_size", None) or args.padded_vocab_size,
        max_position_embeddings=getattr(args, "max_position_embeddings", 4096),
        norm_epsilon=getattr(args, "norm_epsilon", 1e-6), rope_theta=getattr(args, "rotary_base", 10000.0),
        rope_scaling=getattr(args, "hf_rope_scaling", None),
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", True),
        attention_bias=getattr(args, "add_qkv_bias", False), dtype=None, sliding_window=None, raw={}, **layer_fields)


def config_from_args(args: Namespace, where: str) -> ModelConfig:
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size"):
        if not isinstance(getattr(args, field, None), int):
            raise ConversionError(f"{where}: args has no integer {field!r}; not a Megatron-Core GPT checkpoint")
    return _config_from_args(args)


def _family(cfg: ModelConfig, where: str) -> Family:
    family = family_for(cfg.architecture, where)
    if cfg.hf_layers:  # a GPT model laid out as a MambaModel
        from .families.gpt_hybrid import gpt_as_hybrid

        family = gpt_as_hybrid(family)
    return family


def source_layout(args: Namespace, fmt: str, impl: str, grouped: bool) -> TargetLayout:
    return TargetLayout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                        vpp=getattr(args, "virtual_pipeline_model_parallel_size", None), ckpt_format=fmt,
                        transformer_impl=impl, ep=getattr(args, "expert_model_parallel_size", 1) or 1,
                        etp=getattr(args, "expert_tensor_parallel_size", None) if getattr(args, "num_experts", None)
                        else None, moe_grouped_gemm=grouped,
                        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128) or 128,
                        **_pipeline_split(args))


def _pipeline_split(args: Namespace) -> dict:
    """The uneven pipeline split a Megatron-LM job was launched with (its flags, as arguments.py names them)."""
    layout = getattr(args, "pipeline_model_parallel_layout", None)
    if layout is not None and not isinstance(layout, str):
        raise ConversionError(f"args.pipeline_model_parallel_layout is a {type(layout).__name__}, not the layout "
                              f"string Megatron-LM's --pipeline-model-parallel-layout gives")
    return dict(first_stage_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
                last_stage_layers=getattr(args, "decoder_last_pipeline_num_layers", None),
                embedding_in_split=bool(getattr(args, "account_for_embedding_in_pipeline_split", False)),
                loss_in_split=bool(getattr(args, "account_for_loss_in_pipeline_split", False)),
                stage_layout=layout)


def _logical_tensor(name: str, shape: tuple[int, ...], dtype: str) -> SourceTensor:
    return SourceTensor(name, "", dtype, shape, 0, math.prod(shape) * DTYPE_SIZES[dtype])


def _add_covers(covers, rule, impl, names, cfg, tp, r, padded_vocab, stored_name, stored_shape, where):
    """Covers of one legacy shard (TP rank r's blocks stacked on dim 0), checked against its stored shape."""
    shapes = hf_shapes(rule, cfg)
    row = 0
    blks = rule.blocks(impl, shapes, names, cfg, tp, r, padded_vocab)
    expected = (1,) * rule.unsqueeze + (sum(b.shape[0] for b in blks),) + blks[0].shape[1:]
    if tuple(stored_shape) != expected:
        raise ConversionError(f"{where}: tensor {stored_name.rsplit('/', 1)[-1]!r} has shape {list(stored_shape)}, "
                              f"but the checkpoint's args imply {list(expected)}")
    for b in blks:
        for p in b.pieces:
            if p.source is not None:
                covers[p.source].append(Cover(p.source, p.rows, p.cols, stored_name, row + p.dst_row))
        row += b.shape[0]


def _detect_impl(keys: set[str], family: Family) -> str:
    """Which layer spec wrote these keys: the first rule whose TE and local names differ decides."""
    for rule in family.rules:
        if rule.local and rule.local != rule.megatron:
            local, te = name_pattern(rule.local), name_pattern(rule.megatron)
            for k in keys:
                if local.fullmatch(k):
                    return "local"
                if te.fullmatch(k):
                    return "transformer_engine"
    return "transformer_engine"


def _open_legacy(path: str, folder: str) -> MegatronSource:
    rank_files = sorted(glob.glob(os.path.join(folder, "mp_rank_*", "model_optim_rng.pt")))
    if not rank_files:
        raise ConversionError(f"{folder}: no mp_rank_*/model_optim_rng.pt files")
    meta = {f: read_pt_metadata(f) for f in rank_files}
    first, _ = meta[rank_files[0]]
    legacy_version = None
    if isinstance(first, dict) and legacy_gpt.is_legacy_gpt(first):  # pre-Megatron-Core GPT names
        meta, legacy_version = legacy_gpt.as_mcore_files(meta, rank_files[0])
        first, _ = meta[rank_files[0]]
    args = first.get("args") if isinstance(first, dict) else None
    if not isinstance(args, Namespace):
        raise ConversionError(f"{rank_files[0]}: no 'args' namespace; cannot tell the model or its layout")
    cfg = config_from_args(args, rank_files[0])
    family = _family(cfg, f"{rank_files[0]} (args)")
    for f, (obj, _) in meta.items():
        version = obj.get("checkpoint_version", 0)
        if not isinstance(version, (int, float)) or version < 3.0:
            raise ConversionError(f"{f}: checkpoint_version {version!r} is below 3.0 with Megatron-Core names "
                                  f"(older releases wrote only the legacy GPT names); not supported")
        if obj.get("iteration") != first.get("iteration"):
            raise ConversionError(f"{f}: iteration {obj.get('iteration')} differs from {rank_files[0]}'s "
                                  f"{first.get('iteration')} (mixed iterations)")
    containers = legacy_gpt.model_containers(first)
    keys = {k for c in containers for k in first[c]}
    impl = _detect_impl(keys, family)
    grouped = any(".mlp.experts.linear_fc1.weight" in k for f in rank_files for c in containers
                  for k in meta[f][0].get(c, {}))
    layout = source_layout(args, "torch", impl, grouped)
    try:
        layout.validate(cfg)
    except ConversionError as e:
        raise ConversionError(f"{rank_files[0]}: the checkpoint's own args are inconsistent: {e}") from None
    expected = {os.path.join(folder, layout.legacy_rank_file(t, p, k))
                for t in range(layout.tp) for p in range(layout.pp) for k in range(layout.ep)}
    missing = sorted(expected - set(rank_files))
    if missing:
        raise ConversionError(f"{missing[0]}: rank file missing ({len(missing)} of {len(expected)} missing for "
                              f"TP{layout.tp} PP{layout.pp}" + (f" EP{layout.ep}" if layout.ep > 1 else "") + ")")

    stored: dict[str, SourceTensor] = {}

    def stored_tensor(file: str, container: str, key: str) -> SourceTensor:
        obj, offsets = meta[file]
        ref = obj.get(container, {}).get(key)
        if not isinstance(ref, TensorRef):
            raise ConversionError(f"{file}: tensor {key!r} missing from {container!r}")
        if not ref.contiguous:
            raise ConversionError(f"{file}: tensor {key!r} is not contiguous; cannot read it in place")
        itemsize = DTYPE_SIZES[ref.storage.dtype]
        name = f"{os.path.relpath(file, path)}/{container}/{key}"
        t = SourceTensor(name, file, ref.storage.dtype, ref.shape, offsets[ref.storage.key] + ref.offset * itemsize,
                         math.prod(ref.shape) * itemsize)
        stored[name] = t
        return t

    placement = layout.layer_placement(cfg.num_layers)
    padded = args.padded_vocab_size
    per_ep = cfg.num_experts // layout.ep if cfg.num_experts else 0
    covers: dict[str, list[Cover]] = defaultdict(list)
    logical: dict[str, SourceTensor] = {}
    for rule in family.rules:
        if rule.tied_to and cfg.tie_word_embeddings:
            continue
        probe_key = rule.name(impl, grouped)
        if rule.optional and not any(probe_key.format(i=j, e=0) in first[c] for c in containers
                                     for j in range(cfg.num_layers)):
            continue
        tp = layout.expert_tp if rule.expert else layout.tp
        for i, e in instances(rule, cfg):
            names = rule.hf_names(i, e, cfg)
            p, v, j = layout.place(rule, i, placement)
            ep_rank, local = divmod(e, per_ep) if e is not None else (0, None)
            key = rule.name(impl, grouped).format(i=j, e=local)
            dtype = None
            for r in ([0] if rule.kind_for(impl) is Kind.REPLICATED else range(tp)):
                file = os.path.join(folder, layout.legacy_rank_file(r, p, ep_rank))
                t = stored_tensor(file, layout.container(v), key)
                dtype = t.dtype
                _add_covers(covers, rule, impl, names, cfg, tp, r, padded, t.name, t.shape, file)
                if rule.unsqueeze:  # read as the HF tensor's shape: the same bytes
                    t = stored[t.name] = dataclasses.replace(t, shape=t.shape[rule.unsqueeze:])
            for n, shape in zip(names, hf_shapes(rule, cfg)):
                logical[n] = _logical_tensor(n, shape, dtype)
    if legacy_version is not None:
        covers = legacy_gpt.reorder_qkv(covers, legacy_version, cfg.num_attention_heads // layout.tp, cfg.kv_channels)
    fmt = "torch" if legacy_version is None else "legacy_gpt"
    return MegatronSource(path, fmt, args, cfg, family, layout, stored, dict(covers), logical, rank_files)


# ---------------------------------------------------------------------------------------------------
# torch_dist folders.


def _open_torch_dist(path: str, folder: str) -> MegatronSource:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_dcp_metadata(folder)
    common_path = os.path.join(folder, "common.pt")
    if not os.path.exists(common_path):
        raise ConversionError(f"{common_path}: missing (holds the args that describe the model)")
    common, _ = read_pt_metadata(common_path)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, Namespace):
        raise ConversionError(f"{common_path}: no 'args' namespace; cannot tell the model")
    cfg = config_from_args(args, common_path)
    family = _family(cfg, f"{common_path} (args)")
    tensors = {k: m for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    layout = source_layout(args, "torch_dist", "transformer_engine", False)
    stacked = cfg.layers_alike
    storage = {(idx.fqn, tuple(idx.offset)): info for idx, info in md.storage_data.items() if idx.offset is not None}
    files = sorted({os.path.join(folder, info.relative_path) for info in storage.values()})
    for f in files:
        if not os.path.exists(f):
            raise ConversionError(f"{f}: data file missing (named by {folder}/.metadata)")
    stored: dict[str, SourceTensor] = {}
    covers: dict[str, list[Cover]] = defaultdict(list)
    logical: dict[str, SourceTensor] = {}
    padded = None
    for rule in family.rules:
        if rule.tied_to and cfg.tie_word_embeddings:
            continue
        for i, e in instances(rule, cfg):
            layer_key = None if (stacked or i is None) else i
            # The local spec keys a MoE layer's pre-MLP norm differently; take whichever was written.
            first_key = rule.first_dist_key
            key = next((k for k in (rule.torch_dist_key(impl, layer_key) for impl in ("transformer_engine", "local"))
                        if first_key(k) in tensors), rule.torch_dist_key("transformer_engine", layer_key))
            if first_key(key) not in tensors:
                if rule.optional:
                    break
                raise ConversionError(f"{folder}: tensor {first_key(key)!r} missing from the checkpoint's metadata")
            lead = tuple(x for x in ((i if stacked else None), e) if x is not None) + (0,) * rule.unsqueeze
            names = rule.hf_names(i, e, cfg)
            shapes = hf_shapes(rule, cfg)
            if rule.kind is Kind.VOCAB:
                padded = tensors[key].size[len(lead)]
            padded_vocab = padded or args.padded_vocab_size
            # With TP 1 the blocks tile the whole Megatron tensor: global row = block offset + dst_row.
            full_pieces = [(b.offset[0] + p.dst_row, p)
                           for b in rule.blocks("transformer_engine", shapes, names, cfg, 1, 0, padded_vocab)
                           for p in b.pieces if p.source is not None]
            for key, first, expected in rule.dist_sections(key, full_shape(rule.kind, shapes, padded_vocab), cfg):
                if key not in tensors:
                    raise ConversionError(f"{folder}: tensor {key!r} missing from the checkpoint's metadata")
                meta = tensors[key]
                if tuple(meta.size[len(lead):]) != expected:
                    raise ConversionError(f"{folder}: tensor {key!r} has global shape {list(meta.size)}, but the "
                                          f"checkpoint's args imply {list(expected)} after {len(lead)} leading axes")
                dtype = DTYPE_NAMES.get(meta.properties.dtype)
                if dtype is None:
                    raise ConversionError(f"{folder}: tensor {key!r} has unsupported dtype {meta.properties.dtype}")
                _add_chunk_covers(stored, covers, folder, key, meta, lead, first, storage, full_pieces, names, shapes,
                                  dtype)
            for n, shape in zip(names, shapes):
                logical[n] = _logical_tensor(n, shape, dtype)
    _check_covered(logical, covers, folder)
    return MegatronSource(path, "torch_dist", args, cfg, family, layout, stored, dict(covers), logical, files)


def _add_chunk_covers(stored, covers, folder, key, meta, lead, first, storage, full_pieces, names, shapes, dtype):
    """The chunks of one DCP tensor as stored tensors, and the HF rows and columns each holds. `first`: the
    row of the full Megatron tensor where this key's tensor begins (a section stored under its own key)."""
    for chunk in meta.chunks:
        off, size = tuple(chunk.offsets), tuple(chunk.sizes)
        if off[:len(lead)] != lead:
            continue
        if any(s != 1 for s in size[:len(lead)]):
            raise ConversionError(f"{folder}: tensor {key!r} has a chunk spanning several layers/experts "
                                  f"({list(size)}); not supported")
        info = storage.get((key, off))
        if info is None:
            raise ConversionError(f"{folder}: chunk {key!r} at {list(off)} has no storage entry")
        inner_off, inner = off[len(lead):], size[len(lead):]
        name = f"{key}@{','.join(map(str, off))}"
        stored[name] = SourceTensor(name, os.path.join(folder, info.relative_path), dtype, inner,
                                    info.offset, info.length, encoding="torch_save")
        row0 = first + (inner_off[0] if inner_off else 0)
        rows = inner[0] if inner else 1
        cols = (inner_off[1], inner_off[1] + inner[1]) if len(inner) > 1 else None
        for start, p in full_pieces:
            lo, hi = max(row0, start), min(row0 + rows, start + p.nrows)
            if lo >= hi:
                continue
            hf_rows = (p.rows[0] + lo - start, p.rows[0] + hi - start)
            width = shapes[names.index(p.source)][1] if len(shapes[names.index(p.source)]) > 1 else None
            chunk_cols = None if (cols is None or cols == (0, width)) else cols
            covers[p.source].append(Cover(p.source, hf_rows, chunk_cols, name, lo - row0))


def _check_covered(logical: dict[str, SourceTensor], covers: dict[str, list[Cover]], where: str) -> None:
    """Every element of every logical tensor is stored somewhere (chunks may be missing from metadata)."""
    for name, t in logical.items():
        width = t.shape[1] if len(t.shape) > 1 else 1
        area = sum((c.rows[1] - c.rows[0]) * ((c.cols[1] - c.cols[0]) if c.cols else width)
                   for c in covers.get(name, []))
        if area < t.rows * width:
            raise ConversionError(f"{where}: the stored chunks cover only {area} of {t.rows * width} elements "
                                  f"of {name}")


def open_source(path: str) -> MegatronSource:
    folder = iteration_dir(path)
    if os.path.exists(os.path.join(folder, "metadata.json")):
        return _open_torch_dist(path, folder)
    return _open_legacy(path, folder)
