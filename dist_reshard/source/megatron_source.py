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

from ..config import arch_args
from ..families import legacy_gpt
from ..base.dtypes import DTYPE_NAMES
from ..base.errors import ConversionError
from ..families import family_for
from ..config.hf_config import HYBRID_MODEL_TYPES, MODEL_TYPES, ModelConfig, config_from_dict
from ..config.layout import TargetLayout, padded_vocab_size
from ..families.mapping import Family, Kind, full_shape, hf_shapes, instances, name_pattern
from ..formats.safe_pickle import TensorRef, read_dcp_metadata, read_pt_metadata
from ..formats.safetensors_index import DTYPE_SIZES, SourceTensor
from . import zero_tensors

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
    # Non-model state left out (optimizer, rng, scheduler, `_extra_state`, a tied output layer's copy of the
    # embedding): name -> [entries, bytes].
    skipped: dict[str, list[int]] = dataclasses.field(default_factory=dict)


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


def _config_from_args(args: Namespace, where: str = "args", vocab_size: int | None = None) -> ModelConfig:
    """The model the args describe (`arch_args` reads every architecture arg), of the family they imply.
    The HF config an HF -> Megatron conversion stored in the args (`args.hf_config`) is kept for the way back
    only while it states exactly these facts: the args are what Megatron itself computed with."""
    stored = getattr(args, "hf_config", None)
    pattern = getattr(args, "hybrid_override_pattern", None)
    stored_gpt = isinstance(stored, dict) and stored.get("architectures") and \
        stored.get("model_type") not in HYBRID_MODEL_TYPES
    if pattern and set(pattern) <= {"*", "-"} and (getattr(args, "swiglu", False) or stored_gpt):
        # A GPT model laid out as a MambaModel: read as the GPT model, then placed by the pattern.
        from ..families.gpt_hybrid import gpt_layers_as_hybrid

        gpt = Namespace(**dict(vars(args), num_layers=pattern.count("*"), hybrid_override_pattern=None,
                               is_hybrid_model=False))
        return gpt_layers_as_hybrid(_config_from_args(gpt, where, vocab_size), pattern,
                                    "args.hybrid_override_pattern")
    if getattr(args, "vision_model_type", None):  # a LLaVAModel checkpoint
        if isinstance(stored, dict) and stored.get("architectures"):
            try:
                return config_from_dict(stored, "args.hf_config")
            except ConversionError:
                pass
        from ..config.llava_config import llava_hf_config_from_args

        return config_from_dict(llava_hf_config_from_args(args, "args"), "args")
    facts = arch_args.read(args, where)
    if arch_args.gpt_oss(args):
        return _gpt_oss_config(args, facts, stored, where, vocab_size)
    arch = architecture_from_args(args, facts, where)
    true_vocab = vocab_size or getattr(args, "true_vocab_size", None) or getattr(args, "vocab_size", None)
    cfg = ModelConfig(
        architecture=arch, model_type=getattr(args, "hf_model_type", None) or MODEL_TYPES.get(arch, ""),
        vocab_size=true_vocab or args.padded_vocab_size, dtype=None, raw={},
        **{"rope_theta": 10000.0, "rope_scaling": None, **facts})
    if isinstance(stored, dict) and stored.get("architectures"):
        try:
            kept = config_from_dict(stored, "args.hf_config")
        except ConversionError:
            kept = None
        if kept is not None and (kept.raw.get("num_nextn_predict_layers") or 0) >= cfg.mtp_layers:
            # config.json only declares MTP layers; how many the checkpoint holds the args say.
            kept = dataclasses.replace(kept, mtp_layers=cfg.mtp_layers)
        if kept is not None and kept.architecture == arch and not differing_facts(kept, cfg):
            return dataclasses.replace(kept, vocab_size=cfg.vocab_size)
    return cfg


def _gpt_oss_config(args, facts, stored, where, vocab_size) -> ModelConfig:
    """GPT-OSS args (its sinks: softmax_type "learnable"): the per-layer attention pattern, the clamp and the
    YaRN fields have no ModelConfig facts, so the HF config this project stores beside them is the model,
    checked against every fact the args do state."""
    if not (isinstance(stored, dict) and stored.get("model_type") == "gpt_oss"):
        raise ConversionError(f"{where}: GPT-OSS args (softmax_type 'learnable') without the GPT-OSS HF config "
                              f"(args.hf_config) that states its layer_types and swiglu_limit")
    kept = config_from_dict(stored, "args.hf_config")
    if vocab_size:
        kept = dataclasses.replace(kept, vocab_size=vocab_size)
    checked = [f for f in arch_args.FACTS if f in facts and f not in arch_args.GPT_OSS_FACTS]
    diff = differing_facts(kept, dataclasses.replace(kept, **{f: facts[f] for f in checked}), checked)
    if diff:
        field, value, arg_value = diff[0]
        raise ConversionError(f"{where}: args.hf_config states {field} = {value!r} but the args {arg_value!r}")
    return kept




def _features(arch: str) -> tuple:
    """What an architecture's modules hold beyond a dense Llama: (q/k norms, experts, shared expert gate,
    multi-latent attention, mamba mixers, LayerNorms with a bias and an ungated MLP, gated DeltaNet layers)."""
    if arch in ("Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM"):
        return (True, True, True, False, False, False, True)
    if arch == "Qwen3_5ForCausalLM":
        return (True, False, False, False, False, False, True)
    return (arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM",
                     "DeepseekV2ForCausalLM", "Glm4MoeLiteForCausalLM", "Ernie4_5_MoeForCausalLM"),
            arch == "Qwen2MoeForCausalLM",
            arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeLiteForCausalLM"),
            arch in ("NemotronHForCausalLM", "Mamba2ForCausalLM"),
            arch == "NemotronForCausalLM", False)


def _glm_stated(args: Namespace, qk_norm: bool) -> bool:
    """The args are GLM-4.5's: this project's `hf_architecture` says so, and its q/k norms (a config switch no
    fact states) are stated by the stored HF config when the args have them."""
    stored = getattr(args, "hf_config", None)
    return getattr(args, "hf_architecture", None) == "Glm4MoeForCausalLM" and (
        not qk_norm or (isinstance(stored, dict) and stored.get("use_qk_norm") is True))


def architecture_from_args(args: Namespace, facts: dict, where: str) -> str:
    """The HF family whose modules are the ones the args build: MLA -> DeepSeek-V3 (V2: a softmax router); experts -> Qwen3-MoE (q/k
    norms), Qwen2-MoE (gated shared expert) or Mixtral (every layer MoE, top-k renormalised); hybrid ->
    Nemotron-H or Mamba-2; dense -> Nemotron-4 (LayerNorm), Qwen3 (q/k norms), Qwen2 (q/k/v bias), Mistral (a
    window), else Llama.
    A combination no family has is refused naming the arg. This project's own `hf_architecture` arg picks
    among families with the same modules (Llama or Mistral)."""
    qk_norm = bool(getattr(args, "qk_layernorm", False))
    if facts.get("linear_layers"):  # experimental_attention_variant "gated_delta_net" (arch_args reads it so)
        if not qk_norm or facts.get("num_experts") and not (
                facts.get("shared_expert_ffn_hidden_size") and getattr(args, "moe_shared_expert_gate", False)
                and facts.get("router_score") == "softmax"):
            raise ConversionError(f"{where}: gated DeltaNet args without q/k norms, or with experts but not "
                                  f"Qwen3-Next's MoE (softmax router, gated shared expert): no HF family has those "
                                  f"modules")
        # Qwen3.5-MoE has Qwen3-Next's modules (the in_proj Megatron holds is the same): args.hf_architecture tells.
        derived = "Qwen3NextForCausalLM" if facts.get("num_experts") else "Qwen3_5ForCausalLM"
        stored = getattr(args, "hf_architecture", None)
        return stored if stored in MODEL_TYPES and _features(stored) == _features(derived) else derived
    beyond = next((n for n in ("layer_kinds", "kv_lora_rank", "num_experts") if facts.get(n)), None)
    if facts.get("normalization", "RMSNorm") != "RMSNorm" and beyond:
        raise ConversionError(f"{where}: args.normalization = {facts['normalization']!r} with {beyond} "
                              f"{facts[beyond]!r}: of the HF families only Nemotron-4 uses LayerNorm, and it has "
                              f"no experts, latent attention or mamba layers")
    if facts.get("layer_kinds"):
        kinds = set(facts["layer_kinds"])
        if "E" in kinds:
            raise ConversionError(f"{where}: args.hybrid_override_pattern has MoE layers (E); not supported")
        derived = "Mamba2ForCausalLM" if kinds == {"M"} else "NemotronHForCausalLM"
    elif facts.get("kv_lora_rank") and getattr(args, "multi_latent_attention", False):
        # DeepSeek-V2 routes by softmax, V3 by sigmoid.
        derived = "DeepseekV2ForCausalLM" if facts.get("router_score") == "softmax" and facts.get(
            "num_experts") else "DeepseekV3ForCausalLM"
    elif facts.get("num_experts") and facts.get("rotary_interleaved"):
        # Of the HF MoE families only Ernie-4.5 rotates interleaved pairs: softmax, renormalised, ungated shared.
        if qk_norm or facts.get("router_score") != "softmax" or not facts["norm_topk_prob"] or getattr(
                args, "moe_shared_expert_gate", False):
            raise ConversionError(f"{where}: args.rotary_interleaved = True with q/k norms, a sigmoid router, "
                                  f"moe_router_pre_softmax or a gated shared expert: Ernie-4.5 MoE, the one HF MoE "
                                  f"family rotating interleaved pairs, has none of them")
        derived = "Ernie4_5_MoeForCausalLM"
    elif facts.get("num_experts"):
        if facts.get("router_score") != "softmax":
            if not (facts.get("router_score") == "sigmoid" and _glm_stated(args, qk_norm)):
                raise ConversionError(f"{where}: args.moe_router_score_function = {facts.get('router_score')!r}: HF "
                                      f"routes by sigmoid scores only in DeepSeek-V3 (multi-latent attention) and "
                                      f"GLM-4.5 (which args.hf_architecture names, with args.hf_config when it has "
                                      f"q/k norms)")
            return "Glm4MoeForCausalLM"
        shared, gate = facts.get("shared_expert_ffn_hidden_size"), getattr(args, "moe_shared_expert_gate", False)
        if qk_norm:
            if shared:
                raise ConversionError(f"{where}: args.moe_shared_expert_intermediate_size = {shared} with q/k norms: "
                                      f"Qwen3-MoE has no shared expert")
            derived = "Qwen3MoeForCausalLM"
        elif shared:
            if not gate:
                raise ConversionError(f"{where}: args.moe_shared_expert_gate = False: Qwen2-MoE's shared expert is "
                                      f"gated, and no other HF MoE family without MLA has an ungated one but "
                                      f"Ernie-4.5 (args.rotary_interleaved)")
            derived = "Qwen2MoeForCausalLM"
        elif not all(facts["moe_layers"]):
            raise ConversionError(f"{where}: args.moe_layer_freq = {getattr(args, 'moe_layer_freq', None)!r} mixes "
                                  f"dense and MoE layers, which Mixtral cannot (and Qwen2/3-MoE need a shared "
                                  f"expert or q/k norms)")
        elif not facts["norm_topk_prob"]:
            raise ConversionError(f"{where}: args.moe_router_pre_softmax = True (top-k weights not renormalised): "
                                  f"Mixtral always renormalises, and Qwen2/3-MoE need a shared expert or q/k norms")
        else:
            derived = "MixtralForCausalLM"
    elif facts.get("normalization") == "LayerNorm":  # Nemotron-4's flags (arch_args refuses LayerNorm otherwise)
        if qk_norm:
            raise ConversionError(f"{where}: args.qk_layernorm = True with LayerNorm: Nemotron-4 has no q/k norms")
        derived = "NemotronForCausalLM"
    else:
        derived = ("Qwen3ForCausalLM" if qk_norm else "Qwen2ForCausalLM" if facts.get("attention_bias") else
                   "MistralForCausalLM" if facts.get("sliding_window") else "LlamaForCausalLM")
    if facts.get("rotary_percent", 1.0) != 1.0 and derived != "NemotronForCausalLM":
        raise ConversionError(f"{where}: args.rotary_percent = {facts['rotary_percent']!r}: of the HF families only "
                              f"GLM-4.5 and Nemotron-4 rotate part of each head, and {derived} rotates all of it")
    if facts.get("rotary_interleaved") and derived != "Ernie4_5_MoeForCausalLM":
        raise ConversionError(f"{where}: args.rotary_interleaved = True: of the HF families only Ernie-4.5 MoE "
                              f"rotates interleaved channel pairs, and {derived} rotates the two halves of each head")
    stored = getattr(args, "hf_architecture", None)
    if isinstance(stored, str) and stored not in MODEL_TYPES:
        family_for(stored, f"{where} (args.hf_architecture)")  # refuses an unknown one by name
    if isinstance(stored, str) and stored in MODEL_TYPES and _features(stored) == _features(derived):
        return stored
    return derived


def differing_facts(a: ModelConfig, b: ModelConfig, fields=None) -> list[tuple[str, object, object]]:
    """The table's facts on which two configs differ, as (field, a's value, b's value)."""
    names = fields or arch_args.FACTS + ("vocab_size",)
    out = []
    for n in names:
        x, y = getattr(a, n), getattr(b, n)
        if n == "rope_scaling":
            x, y = _canonical_rope(x), _canonical_rope(y)
        if n == "moe_layers" and not (a.num_experts or b.num_experts):
            continue
        if x != y:
            out.append((n, getattr(a, n), getattr(b, n)))
    return out


def _canonical_rope(scaling):
    """A rope scaling dict as the fields Megatron-Core applies, with their defaults filled in."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    known = ({k: v for k, v in arch_args.LLAMA3_ROPE.items() if k != "rope_type"} | {"factor": 8.0}
             if kind == "llama3" else {k: d for k, (_, d) in arch_args.YARN.items()} if kind == "yarn" else None)
    if known is None:
        return dict(scaling)
    return {"rope_type": kind} | {k: float(scaling.get(k, d)) for k, d in known.items()}


def config_from_args(args: Namespace, where: str, vocab_size: int | None = None) -> ModelConfig:
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size"):
        if not isinstance(getattr(args, field, None), int):
            raise ConversionError(f"{where}: args has no integer {field!r}; not a Megatron-Core GPT checkpoint")
    return _config_from_args(args, where, vocab_size)


# Facts that do not change what the model computes (HF builds rotary tables for any length), so a reference HF
# config may state its own; vocab_size is checked against the stored rows on its own.
_PREFLIGHT_EXEMPT = ("max_position_embeddings", "vocab_size", "mtp_layers")  # a config only declares MTP layers


def _model_config(args: Namespace, where: str, vocab_size: int | None, reference: ModelConfig | None) -> ModelConfig:
    """The args' model; with a reference HF config (`--hf-config`), its family and true vocabulary, after a
    preflight refusing any fact on which the two disagree (naming it and both values)."""
    padded = getattr(args, "padded_vocab_size", None)
    if reference is not None and vocab_size is None:
        vocab_size = reference.vocab_size
    divisor = (getattr(args, "make_vocab_size_divisible_by", None) or 128) * (
        getattr(args, "tensor_model_parallel_size", None) or 1)
    if vocab_size is not None and isinstance(padded, int) and (
            vocab_size <= 0 or padded_vocab_size(vocab_size, divisor, 1) != padded):
        raise ConversionError(f"{'--hf-config' if reference else '--vocab-size'}: vocab_size = {vocab_size} but the "
                              f"checkpoint stores {padded} rows (args.padded_vocab_size), which Megatron pads to a "
                              f"multiple of {divisor}: the true vocabulary is between {padded - divisor + 1} and "
                              f"{padded}")
    stored_true = getattr(args, "true_vocab_size", None) or getattr(args, "vocab_size", None)
    if vocab_size is not None and stored_true and stored_true != vocab_size and reference is not None:
        raise ConversionError(f"--hf-config: vocab_size = {vocab_size} but the checkpoint's args say {stored_true} "
                              f"(args.true_vocab_size / args.vocab_size)")
    cfg = config_from_args(args, where, vocab_size)
    if reference is None:
        return cfg
    if reference.architecture != cfg.architecture:
        if _features(reference.architecture) != _features(cfg.architecture) or cfg.stacks:
            raise ConversionError(f"--hf-config: architectures = [{reference.architecture!r}] but the checkpoint's "
                                  f"args describe a {cfg.architecture} model")
        cfg = dataclasses.replace(cfg, architecture=reference.architecture, model_type=reference.model_type)
    names = [f for f in arch_args.FACTS if f not in _PREFLIGHT_EXEMPT]
    diff = differing_facts(reference, cfg, names)
    if diff:
        field, ref_value, value = diff[0]
        raise ConversionError(f"--hf-config: {field} = {ref_value!r} in the HF config but {value!r} in the "
                              f"checkpoint's args ({where})")
    return cfg


def _family(cfg: ModelConfig, where: str) -> Family:
    family = family_for(cfg.architecture, where)
    if cfg.hf_layers:  # a GPT model laid out as a MambaModel
        from ..families.gpt_hybrid import gpt_as_hybrid

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


def _open_legacy(path: str, folder: str, vocab_size=None, reference=None) -> MegatronSource:
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
    cfg = _model_config(args, rank_files[0], vocab_size, reference)
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
    consumed: set[tuple[str, str, str]] = set()

    def stored_tensor(file: str, container: str, key: str) -> SourceTensor:
        obj, offsets = meta[file]
        ref = obj.get(container, {}).get(key)
        if not isinstance(ref, TensorRef):
            raise ConversionError(f"{file}: tensor {key!r} missing from {container!r}")
        if not ref.contiguous:
            raise ConversionError(f"{file}: tensor {key!r} is not contiguous; cannot read it in place")
        itemsize = DTYPE_SIZES[ref.storage.dtype]
        name = f"{os.path.relpath(file, path)}/{container}/{key}"
        consumed.add((file, container, key))
        t = SourceTensor(name, file, ref.storage.dtype, ref.shape, offsets[ref.storage.key] + ref.offset * itemsize,
                         math.prod(ref.shape) * itemsize)
        stored[name] = t
        return t

    placement = layout.layer_placement(cfg.num_layers)
    padded = args.padded_vocab_size
    per_ep = cfg.num_experts // layout.ep if cfg.num_experts else 0
    covers: dict[str, list[Cover]] = defaultdict(list)
    logical: dict[str, SourceTensor] = {}
    tied_copies, stage_copies = set(), set()
    for rule in family.rules:
        if rule.tied_to and cfg.tie_word_embeddings:
            tied_copies.add(rule.name(impl, grouped))
            continue
        if rule.shared_with or rule.home == "mtp":  # added after the loop / left over by name
            if rule.home == "mtp" and instances(rule, cfg) and layout.mtp_stage() != (0, 0):
                p, v = layout.mtp_stage()
                stage_copies.update((os.path.join(folder, layout.legacy_rank_file(r, p, k)), layout.container(v),
                                     rule.name(impl)) for r in range(layout.tp) for k in range(layout.ep))
            continue
        probe_key = rule.name(impl, grouped)
        if rule.mtp:  # the MTP stage's file holds them
            p, v = layout.mtp_stage()
            probe = [meta[os.path.join(folder, layout.legacy_rank_file(0, p, 0))][0].get(layout.container(v), {})]
        else:
            probe = [first[c] for c in containers]
        if rule.optional and not any(probe_key.format(i=j, e=0) in keys for keys in probe
                                     for j in range(cfg.mtp_layers if rule.mtp else cfg.num_layers)):
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
            # The copies Megatron keeps identical (replicated over TP ranks, dense weights over EP ranks, experts
            # over the TP ranks past ETP) are accounted for by the one read.
            consumed.update((os.path.join(folder, layout.legacy_rank_file(r, p, k)), layout.container(v), key)
                            for r in range(layout.tp) for k in ([ep_rank] if rule.expert else range(layout.ep)))
            for n, shape in zip(names, hf_shapes(rule, cfg)):
                logical[n] = _logical_tensor(n, shape, dtype)
    logical.update(zero_tensors.logical(family, cfg))  # nothing stores them: written back as zeros
    if legacy_version is not None:
        covers = legacy_gpt.reorder_qkv(covers, legacy_version, cfg.num_attention_heads // layout.tp, cfg.kv_channels)
    _add_shared_copies(family, cfg, logical, covers)
    fmt = "torch" if legacy_version is None else "legacy_gpt"
    skipped = _legacy_leftovers(meta, consumed, tied_copies, family, stage_copies)
    return MegatronSource(path, fmt, args, cfg, family, layout, stored, dict(covers), logical, rank_files, skipped)


_RUN_STATE = ("args", "checkpoint_version", "iteration")  # what describes the checkpoint itself, read above


def _refs(obj) -> list:
    """The tensors (as `TensorRef`s) anywhere inside a saved object."""
    if isinstance(obj, TensorRef):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [r for x in obj for r in _refs(x)]
    return []


def _ref_bytes(refs) -> int:
    return sum(math.prod(r.shape) * DTYPE_SIZES[r.storage.dtype] for r in refs)


def _add_shared_copies(family: Family, cfg: ModelConfig, logical: dict, covers: dict) -> None:
    """The copies of the embedding and head an HF MTP layer stores (`Rule.shared_with`): Megatron keeps only
    the main tensors, so each copy is read from where the main one is stored."""
    from .mtp_copies import shared_copies

    for copy, main in shared_copies(family, cfg):
        logical[copy] = dataclasses.replace(logical[main], name=copy)
        covers[copy] = [dataclasses.replace(c, hf=copy) for c in covers[main]]


def _legacy_leftovers(meta, consumed, tied_copies, family, stage_copies=frozenset()) -> dict[str, list[int]]:
    """Every model tensor of every rank file was consumed by the family's rules, or the checkpoint holds a
    model this mapping would convert incompletely: refused naming the first ones left over. Everything else
    (optimizer, rng and scheduler state, `_extra_state`) is skipped, counted by name."""
    skipped: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    left = []
    for file, (obj, _) in meta.items():
        containers = legacy_gpt.model_containers(obj)
        for top, value in obj.items():
            if top in _RUN_STATE or top in containers:
                continue
            refs = _refs(value)
            skipped[top][0] += len(refs) or 1  # its tensors, or the one object
            skipped[top][1] += _ref_bytes(refs)
        for c in containers:
            for key, value in obj[c].items():
                refs = _refs(value)
                if key.endswith("_extra_state"):
                    kind = "_extra_state"
                elif any(name_pattern(t).fullmatch(key) for t in tied_copies):
                    kind = "tied output layer (a copy of the embedding)"
                elif (file, c, key) in stage_copies:
                    kind = "the multi-token-prediction stage's copy of the embedding"
                elif refs and (file, c, key) not in consumed:
                    left.append(f"{os.path.basename(os.path.dirname(file))}/{c}/{key}")
                    continue
                else:
                    continue
                skipped[kind][0] += 1
                skipped[kind][1] += _ref_bytes(refs)
    if left:
        raise ConversionError(f"{len(left)} model tensors of the checkpoint are not part of the {family.name} "
                              f"mapping its args describe (first: {', '.join(left[:3])}); converting would drop them")
    return dict(skipped)


# ---------------------------------------------------------------------------------------------------
# torch_dist folders.


def _open_torch_dist(path: str, folder: str, vocab_size=None, reference=None) -> MegatronSource:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_dcp_metadata(folder)
    common_path = os.path.join(folder, "common.pt")
    if not os.path.exists(common_path):
        raise ConversionError(f"{common_path}: missing (holds the args that describe the model)")
    common, _ = read_pt_metadata(common_path)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, Namespace):
        raise ConversionError(f"{common_path}: no 'args' namespace; cannot tell the model")
    cfg = _model_config(args, common_path, vocab_size, reference)
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
    used: set[str] = set()
    for rule in family.rules:
        if (rule.tied_to and cfg.tie_word_embeddings) or rule.shared_with or rule.home == "mtp":
            continue  # torch_dist stores the MTP stage's embedding once, as the embedding
        for i, e in instances(rule, cfg):
            layer_key = None if ((stacked and not rule.mtp) or i is None) else i
            # The local spec keys a MoE layer's pre-MLP norm differently; take whichever was written.
            first_key = rule.first_dist_key
            key = next((k for k in (rule.torch_dist_key(impl, layer_key) for impl in ("transformer_engine", "local"))
                        if first_key(k) in tensors), rule.torch_dist_key("transformer_engine", layer_key))
            if first_key(key) not in tensors:
                if rule.optional:
                    break
                raise ConversionError(f"{folder}: tensor {first_key(key)!r} missing from the checkpoint's metadata")
            lead = tuple(x for x in ((i if stacked and not rule.mtp else None), e) if x is not None) + \
                (0,) * rule.unsqueeze
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
                used.add(key)
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
    _add_shared_copies(family, cfg, logical, covers)
    _check_covered(logical, covers, folder)
    logical.update(zero_tensors.logical(family, cfg))  # nothing stores them: written back as zeros
    skipped = _dist_leftovers(md, used, common, folder, family)
    return MegatronSource(path, "torch_dist", args, cfg, family, layout, stored, dict(covers), logical, files, skipped)


def _dist_leftovers(md, used: set[str], common: dict, folder: str, family: Family) -> dict[str, list[int]]:
    """As `_legacy_leftovers`, for DCP keys: `optimizer.*`, `rng_state`, `*._extra_state` are skipped by name
    (with common.pt's optimizer and scheduler state); any other tensor not consumed is refused."""
    sizes: dict[str, int] = defaultdict(int)
    for idx, info in md.storage_data.items():
        sizes[idx.fqn] += info.length
    skipped: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    left = []
    for key, meta in md.state_dict_metadata.items():
        kind = ("optimizer" if key.startswith("optimizer.") else "rng_state" if key.startswith("rng_state") else
                "_extra_state" if "._extra_state" in key else None)
        if kind is None and not hasattr(meta, "chunks"):  # an object (not a tensor) no rule reads
            kind = key.split("/")[0]
        if kind is None:
            if key not in used:
                left.append(key)
            continue
        skipped[kind][0] += 1
        skipped[kind][1] += sizes[key]
    for top, value in common.items():
        if top not in _RUN_STATE:
            skipped[f"common.pt {top}"][0] += 1
    if left:
        raise ConversionError(f"{folder}: {len(left)} model tensors of the checkpoint are not part of the "
                              f"{family.name} mapping its args describe (first: {', '.join(sorted(left)[:3])}); "
                              f"converting would drop them")
    return dict(skipped)


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


def open_source(path: str, vocab_size: int | None = None, reference: ModelConfig | None = None) -> MegatronSource:
    """`vocab_size`: the true vocabulary (`--vocab-size`); `reference`: an HF config the checkpoint must match
    (`--hf-config`), which also gives the family and the true vocabulary."""
    folder = iteration_dir(path)
    if os.path.exists(os.path.join(folder, "metadata.json")):
        return _open_torch_dist(path, folder, vocab_size, reference)
    return _open_legacy(path, folder, vocab_size, reference)


def true_vocab_known(source: MegatronSource, vocab_size: int | None) -> bool:
    """Whether the checkpoint (or the command line) states the unpadded vocabulary: a run with an HF tokenizer
    stores only args.padded_vocab_size, and its padding rows are indistinguishable from real ones."""
    a = source.args
    return bool(vocab_size or getattr(a, "true_vocab_size", None) or getattr(a, "vocab_size", None))
