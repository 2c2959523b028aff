"""Megatron-LM's pre-Megatron-Core GPT checkpoints (`megatron/legacy/model`), as a renaming of Megatron-Core's.

A legacy GPT rank file has the same layout as Megatron-Core's `torch` format (`iter_*/mp_rank_TT[_PPP]/
model_optim_rng.pt`) but nests its state dict the way the legacy modules save themselves:

    model -> language_model -> embedding -> word_embeddings -> weight
                            -> encoder -> "layers.{i}.input_norm.weight", ..., "final_norm.weight"
                            -> output_layer -> weight                  (untied embeddings)
          -> word_embeddings_for_head -> weight                        (tied, last stage of several)

Every per-rank tensor equals the Megatron-Core local-spec tensor of the table below, shard for shard:
query_key_value is linear_qkv's [ng, (nh/ng + 2) * d] per rank (checkpoint_version >= 2.0), and
dense_h_to_4h with SwiGLU is linear_fc1's [gate_r; up_r] (the legacy MLP chunks its local output in two).
So reading is `to_mcore` on the legacy reader's metadata and writing is `to_legacy` on the planned rank
files; no tensor is transformed, except the QKV rows of checkpoint_version 0 and 1.0 (`reorder_qkv`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from argparse import Namespace

from ..config import arch_args
from ..base.errors import ConversionError

# encoder key (after Megatron's own load-time renames, below) -> Megatron-Core local-spec name, per layer.
LAYER = (
    ("input_norm.weight", "input_layernorm.weight"),
    ("self_attention.query_key_value.weight", "self_attention.linear_qkv.weight"),
    ("self_attention.query_key_value.bias", "self_attention.linear_qkv.bias"),
    ("self_attention.dense.weight", "self_attention.linear_proj.weight"),
    ("post_attention_norm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.dense_h_to_4h.weight", "mlp.linear_fc1.weight"),
    ("mlp.dense_4h_to_h.weight", "mlp.linear_fc2.weight"),
)
# path below the model container -> Megatron-Core name, outside the layers.
OUTER = (
    (("language_model", "embedding", "word_embeddings", "weight"), "embedding.word_embeddings.weight"),
    (("language_model", "encoder", "final_norm.weight"), "decoder.final_layernorm.weight"),
    (("language_model", "output_layer", "weight"), "output_layer.weight"),
    (("word_embeddings_for_head", "weight"), "output_layer.weight"),  # tied head of the last stage (PP > 1)
)
ENCODER = ("language_model", "encoder")
ROPE_BASE = 10000.0  # the legacy language model builds RotaryEmbedding without rotary_base: always 10000

_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_TO_MCORE = {legacy: mcore for legacy, mcore in LAYER}
_TO_LEGACY = {mcore: legacy for legacy, mcore in LAYER}
_OUTER_TO_LEGACY = {mcore: path for path, mcore in OUTER[:3]}


def model_containers(state: dict) -> list[str]:
    """The model containers of a rank file: `model`, or `model0`, `model1`, ... with virtual pipeline."""
    return [c for c in state if c == "model" or (c.startswith("model") and c[5:].isdigit())]


def is_legacy_gpt(state: dict) -> bool:
    return any(isinstance(state[c], dict) and "language_model" in state[c] for c in model_containers(state))


def _older_name(key: str) -> str:
    """Megatron-LM's own renames on load: `layernorm` -> `norm` (ParallelTransformer.load_state_dict) and
    `.attention.` -> `.self_attention.` (TransformerLanguageModel.load_state_dict)."""
    return key.replace("layernorm", "norm").replace(".attention.", ".self_attention.")


def _leaves(tree: dict, path: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, path + (k,))
        else:
            yield path + (k,), v


def to_mcore(container: dict, where: str) -> dict:
    """One legacy model container as Megatron-Core local-spec names (values untouched). Unknown tensors are
    refused by name; `_extra_state` entries (None, newer Megatron's linear layers) carry nothing."""
    lm = container.get("language_model", {})
    if "transformer" in lm and "encoder" not in lm:  # the older key of the encoder
        container = dict(container, language_model=dict({k: v for k, v in lm.items() if k != "transformer"},
                                                        encoder=lm["transformer"]))
    outer = {path: mcore for path, mcore in OUTER}
    out = {}
    for path, value in _leaves(container):
        name = "/".join(path)
        if path[-1].endswith("_extra_state") and value is None:
            continue
        if "position_embeddings" in path:
            raise ConversionError(f"{where}: tensor {name!r}: learned absolute position embeddings; only rotary "
                                  f"(position_embedding_type rope) legacy GPT models map to a supported family")
        key = path[:-1] + (_older_name(path[-1]),) if path[:2] == ENCODER else path
        m = _LAYER_KEY.fullmatch(key[-1]) if key[:2] == ENCODER and len(key) == 3 else None
        if m and m.group(2) in _TO_MCORE:
            out[f"decoder.layers.{m.group(1)}.{_TO_MCORE[m.group(2)]}"] = value
        elif key in outer:
            out[outer[key]] = value
        else:
            raise ConversionError(f"{where}: tensor {name!r} is not part of the dense legacy GPT models "
                                  f"dist_reshard converts (known: {', '.join(p for p, _ in LAYER)} per layer, "
                                  f"embedding, final_norm, output_layer)")
    return out


def to_legacy(tensors: dict, tied_head_on_last_stage: bool) -> dict:
    """A rank file's Megatron-Core local-spec tensors as the legacy model container. `output_layer.weight`
    is the tied head's copy (`word_embeddings_for_head`) when the embeddings are tied."""
    model: dict = {}
    encoder: dict = {}
    for name, value in tensors.items():
        if name.startswith("decoder.layers."):
            i, rest = name[len("decoder.layers."):].split(".", 1)
            encoder[f"layers.{i}.{_TO_LEGACY[rest]}"] = value
        elif name == "output_layer.weight" and tied_head_on_last_stage:
            model["word_embeddings_for_head"] = {"weight": value}
        else:
            path = _OUTER_TO_LEGACY[name]
            if path[:2] == ENCODER:
                encoder[path[2]] = value
                continue
            node = model
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = value
    if encoder:
        lm = model.setdefault("language_model", {})
        order = {mcore: n for n, (_, mcore) in enumerate(LAYER)}

        def key(k):
            m = _LAYER_KEY.fullmatch(k)
            return (0, int(m.group(1)), order[_TO_MCORE[m.group(2)]]) if m else (1, 0, 0)
        lm["encoder"] = dict(sorted(encoder.items(), key=lambda kv: key(kv[0])))
        # Megatron's order: embedding, encoder, output_layer.
        model["language_model"] = {k: lm[k] for k in ("embedding", "encoder", "output_layer") if k in lm}
    if "word_embeddings_for_head" in model:
        model["word_embeddings_for_head"] = model.pop("word_embeddings_for_head")
    return model


# ---------------------------------------------------------------------------------------------------
# Reading: checkpoint versions and the args of older Megatron-LM releases.


def checkpoint_version(states: dict, first: str) -> float:
    """The files' common checkpoint_version; a missing one is 0, as Megatron-LM's load_checkpoint reads it."""
    versions = {f: s.get("checkpoint_version", 0) for f, s in states.items()}
    version = versions[first]
    for f, v in versions.items():
        if v != version:
            raise ConversionError(f"{f}: checkpoint_version {v!r} differs from {first}'s {version!r}")
    # fix_query_key_value_ordering: 0 and 1.0 are reordered, other versions below 2.0 are invalid.
    if isinstance(version, bool) or not isinstance(version, (int, float)) or not (
            version in (0, 1.0) or 2.0 <= version <= 3.0):
        raise ConversionError(f"{first}: checkpoint_version {version!r} is not one Megatron-LM wrote (0, 1.0, "
                              f"2.0 to 3.0); not supported")
    return float(version)


def as_mcore_files(meta: dict, first: str) -> tuple[dict, float]:
    """The legacy reader's metadata ({file: (saved object, record offsets)}) of legacy GPT rank files, as
    Megatron-Core rank files would hold it: local-spec names, today's args, and the files' own
    checkpoint_version returned beside them (it decides `reorder_qkv`)."""
    version = checkpoint_version({f: obj for f, (obj, _) in meta.items()}, first)
    out = {}
    for f, (obj, offsets) in meta.items():
        state = dict(obj, checkpoint_version=3.0)
        if isinstance(obj.get("args"), Namespace):
            state["args"] = normalise_args(obj["args"], version, f)
        for c in model_containers(obj):
            state[c] = to_mcore(obj[c], f)
        out[f] = (state, offsets)
    return out, version


def normalise_args(args: Namespace, version: float, where: str) -> Namespace:
    """The args under today's names (before 3.0 the TP size was `model_parallel_size` and there was no
    pipeline parallelism), after refusing what the dense families cannot express."""
    args = copy.copy(args)
    if getattr(args, "tensor_model_parallel_size", None) is None and hasattr(args, "model_parallel_size"):
        args.tensor_model_parallel_size = args.model_parallel_size
    if version < 3.0 or getattr(args, "pipeline_model_parallel_size", None) is None:
        args.pipeline_model_parallel_size = 1
    # The legacy model's RotaryEmbedding takes neither rotary_base nor rope scaling: whatever the args say, it
    # rotates with this base, unscaled.
    args.rotary_base, args.use_rope_scaling = ROPE_BASE, False
    arch_args.check_fixed(args, where)
    if getattr(args, "num_experts", None):
        raise ConversionError(f"{where}: args.num_experts = {args.num_experts!r}: a legacy GPT model with SwitchMLP "
                              f"experts; not supported")
    if not getattr(args, "group_query_attention", False):
        args.num_query_groups = args.num_attention_heads  # Megatron-LM reads num_query_groups only with GQA
    if version < 2.0 and args.num_query_groups != args.num_attention_heads:
        raise ConversionError(f"{where}: checkpoint_version {version} predates grouped-query attention, but "
                              f"args.num_query_groups = {args.num_query_groups}")
    return args


def reorder_qkv(covers: dict, version: float, heads_per_rank: int, head_dim: int) -> dict:
    """Covers of query_key_value shards stored in the order of checkpoint_version 0 or 1.0 (before
    grouped-query attention). Megatron-LM's fix_query_key_value_ordering turns a rank's rows, viewed as
    [3, np, hn] (version 0) or [np, hn, 3] (version 1.0), into today's [np, 3, hn]; a cover's rows in
    today's order are mapped back to where the old order stores them."""
    if version >= 2.0:
        return covers
    n, d = heads_per_rank, head_dim

    def old_row(row: int) -> int:
        head, rest = divmod(row, 3 * d)
        part, x = divmod(rest, d)
        return part * n * d + head * d + x if version == 0 else head * d * 3 + x * 3 + part

    out = {}
    for hf, cs in covers.items():
        if not any(".linear_qkv." in c.stored for c in cs):
            out[hf] = cs
            continue
        mapped = []
        for c in cs:
            n_rows = c.rows[1] - c.rows[0]
            old = [old_row(c.stored_row + k) for k in range(n_rows)]
            start = 0
            for k in range(1, n_rows + 1):  # one cover per run of rows the old order keeps adjacent
                if k == n_rows or old[k] != old[k - 1] + 1:
                    mapped.append(dataclasses.replace(c, rows=(c.rows[0] + start, c.rows[0] + k),
                                                      stored_row=old[start]))
                    start = k
        out[hf] = mapped
    return out


# ---------------------------------------------------------------------------------------------------
# Writing: what the legacy model cannot express, and the args it reads.


def check_target(family, cfg) -> None:
    """Refuse, before anything is written, a model Megatron-LM's legacy GPT model cannot express."""
    unmapped = next((r for r in family.rules if (r.local or r.megatron).replace("decoder.layers.{i}.", "")
                     not in _TO_LEGACY and r.megatron not in _OUTER_TO_LEGACY), None)
    refusals = (
        (cfg.mla, f"{cfg.architecture} uses multi-latent attention; the legacy GPT model has only a fused "
                  f"query_key_value"),
        (cfg.num_experts, f"{cfg.architecture} is a mixture of experts; the legacy GPT model has no routed experts"),
        (unmapped, f"{cfg.architecture} tensor {unmapped.hf[0].format(i=0, e=0)!r} ({unmapped.megatron}) has no "
                   f"counterpart in the legacy GPT model" if unmapped else ""),
        (cfg.rope_theta != ROPE_BASE, f"config.json rope_theta = {cfg.rope_theta:g}, but the legacy GPT model always "
                                      f"rotates with base {ROPE_BASE:g} (it never reads rotary_base)"),
        (cfg.rope_scaling, f"config.json rope_scaling = {cfg.rope_scaling}: the legacy GPT model has no such scaling"),
        (cfg.sliding_window, f"config.json sliding_window = {cfg.sliding_window}: the legacy GPT model has no "
                             f"sliding-window attention"),
    )
    for bad, why in refusals:
        if bad:
            raise ConversionError(f"--dst legacy: {why} (Megatron-LM megatron/legacy/model)")


# Set on the written args: Megatron-LM builds the legacy model (megatron/legacy/model) from them; older
# releases went by use_mcore_models, newer ones by use_legacy_models. Layers are the local implementation.
ARGS = dict(use_legacy_models=True, use_mcore_models=False, transformer_impl="local", ckpt_format="torch",
            position_embedding_type="rope", add_position_embedding=False, rotary_base=ROPE_BASE,
            rotary_seq_len_interpolation_factor=None, apply_query_key_layer_scaling=False, use_rope_scaling=False)
