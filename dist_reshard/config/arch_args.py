"""The model facts (`ModelConfig`) as Megatron-LM's `args`: one table, read and written by the same rows.

Each row names a fact, the arg names Megatron-LM has stored it under (the current name first, then the ones
older releases used: `--norm-epsilon` is `args.layernorm_epsilon` from core_v0.16, `args.norm_epsilon` up to
core_v0.15; see docs/megatron-args-facts.md) and Megatron-LM's own default for a checkpoint that lacks it.
Writing stores every name, so any release reads it; reading takes the first name present. `Fixed` rows are
args that change what the model computes and that the HF families cannot express: a checkpoint whose value
differs is refused naming the arg, never converted into a model that computes something else.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Callable

from ..base.errors import ConversionError

_ABSENT = object()

# The rope scaling Megatron-Core applies with --use-rope-scaling (RotaryEmbedding._apply_scaling): Llama 3.x's,
# with only the factor configurable.
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _rope_type(cfg) -> str | None:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type")) if scaling else None


# Groups of rows: which configs write a row and which args read it.
def _gpt(cfg) -> bool:  # a transformer with rotary attention and a SwiGLU MLP (every family but the Mamba ones)
    return not (cfg.layer_kinds and not cfg.hf_layers)


def _gpt_args(args) -> bool:
    return not (_get(args, ("hybrid_override_pattern",), None) and not _get(args, ("swiglu",), False))


def _rope(cfg) -> bool:
    return _gpt(cfg) and not cfg.mla


def _rope_args(args) -> bool:
    return _gpt_args(args) and not _get(args, ("multi_latent_attention",), False)


def _moe(cfg) -> bool:
    return bool(cfg.num_experts)


def _moe_args(args) -> bool:
    return bool(_get(args, ("num_experts",), None))


def _mla(cfg) -> bool:
    return cfg.mla


def _mla_args(args) -> bool:
    return bool(_get(args, ("multi_latent_attention",), False))


def _mamba(cfg) -> bool:
    return bool(cfg.layer_kinds) and not cfg.hf_layers


def _mamba_args(args) -> bool:
    return not _gpt_args(args)


def _layernorm_1p(cfg) -> bool:  # Nemotron-4: LayerNorm with a bias and 1 + weight, a squared-ReLU MLP, no gate
    return _gpt(cfg) and cfg.normalization == "LayerNorm"


def _layernorm_1p_args(args) -> bool:
    """Nemotron-4's three flags together (`--normalization LayerNorm --apply-layernorm-1p --squared-relu`); any
    one alone is refused by the rows that hold the other families to RMSNorm and SwiGLU."""
    return _gpt_args(args) and _get(args, ("normalization",), "LayerNorm") == "LayerNorm" and bool(
        _get(args, ("layernorm_zero_centered_gamma", "apply_layernorm_1p"), False)) and bool(
        _get(args, ("squared_relu",), False))


def _always(_) -> bool:
    return True


def _gdn(cfg) -> bool:  # Qwen3-Next: gated DeltaNet layers, gated attention, zero-centred norms
    return cfg.gated_delta_net


def _gdn_args(args) -> bool:
    return _get(args, ("experimental_attention_variant",), None) == "gated_delta_net"


def _not_gdn(cfg) -> bool:
    return not cfg.gated_delta_net


def _not_gdn_args(args) -> bool:
    return not _gdn_args(args)


def _linear_layers_read(freq, args):
    """Megatron's `linear_attention_freq`: a per-layer list (1 = linear attention) or N (every N-th layer, counting
    from 1, is softmax attention)."""
    layers = args.num_layers
    if isinstance(freq, (list, tuple)):
        if len(freq) != layers:
            raise ConversionError(f"args.linear_attention_freq has {len(freq)} entries for {layers} layers")
        return tuple(bool(x) for x in freq)
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ConversionError(f"args.linear_attention_freq = {freq!r} is not a positive integer or a per-layer list")
    return tuple((i + 1) % freq != 0 for i in range(layers))


@dataclass(frozen=True)
class Arg:
    """Fact `fact` as Megatron arg `names[0]` (older releases: `names[1:]`). `write`: the arg from the config
    (default: the fact itself); `read`: the fact from the arg's value and the other args (default: the value,
    `default` when the checkpoint lacks it). A row with no fact is written only (a second arg of a fact)."""

    fact: str | None
    names: tuple[str, ...]
    default: object = None
    write: Callable | None = None
    read: Callable | None = None
    on: tuple[Callable, Callable] = (_always, _always)  # (writes this config, reads these args)


@dataclass(frozen=True)
class Fixed:
    """An arg that must hold `value` (Megatron-LM's `default` when absent) for the families to express it."""

    names: tuple[str, ...]
    value: object
    default: object
    why: str
    on: tuple[Callable, Callable] = (_always, _always)
    accept: tuple = field(default=())  # further values that compute the same (e.g. 1 for 1.0)


def _get(args, names, default):
    for n in names:
        v = getattr(args, n, _ABSENT)
        if v is not _ABSENT and v is not None:
            return v
    return default


def _gqa_read(groups, args):
    # Megatron-LM reads --num-query-groups (default 1) only with --group-query-attention.
    return groups if _get(args, ("group_query_attention",), False) else args.num_attention_heads


def _llama3_read(on, args):
    if not on:
        return None
    return dict(LLAMA3_ROPE, factor=float(_get(args, ("rope_scaling_factor",), 8.0)))


def _llama3_write(cfg):
    if cfg.mla or cfg.model_type == "gpt_oss":  # their YaRN: MLA's rows below, GPT-OSS's megatron_args flags
        return False
    kind = _rope_type(cfg)
    if kind not in (None, "default", "llama3"):
        raise ConversionError(f"rope_scaling.rope_type = {kind!r}: Megatron-Core's GPT rotary embedding applies only "
                              f"llama3 scaling (--use-rope-scaling)")
    if kind != "llama3":
        return False
    scaling = cfg.rope_scaling
    for k, want in LLAMA3_ROPE.items():
        if k != "rope_type" and float(scaling.get(k, want)) != want:
            raise ConversionError(f"rope_scaling.{k} = {scaling[k]!r}: Megatron-Core's llama3 rope scaling fixes it "
                                  f"to {want} (only the factor is an arg)")
    return True


# MLA's YaRN fields: HF rope_scaling key = Megatron arg (Megatron-LM's default).
YARN = {"factor": ("rotary_scaling_factor", 1.0), "mscale": ("mscale", 1.0), "mscale_all_dim": ("mscale_all_dim", 0.0),
        "beta_fast": ("beta_fast", 32.0), "beta_slow": ("beta_slow", 1.0),
        "original_max_position_embeddings": ("original_max_position_embeddings", 4096)}


def _yarn_read(rope_type, args):
    if rope_type != "yarn":
        return None
    return {"rope_type": "yarn"} | {k: type(d)(_get(args, (name,), d)) for k, (name, d) in YARN.items()}


def _yarn(key, default):
    def write(cfg):
        kind = _rope_type(cfg)
        if kind not in (None, "default", "yarn"):
            raise ConversionError(f"rope_scaling.rope_type = {kind!r}: Megatron-Core's multi-latent attention "
                                  f"applies only YaRN")
        return type(default)((cfg.rope_scaling or {}).get(key, default)) if kind == "yarn" else default
    return write


def _moe_layer_read(freq, args):
    layers = args.num_layers
    if isinstance(freq, (list, tuple)):
        if len(freq) != layers:
            raise ConversionError(f"args.moe_layer_freq has {len(freq)} entries for {layers} layers")
        return tuple(bool(x) for x in freq)
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ConversionError(f"args.moe_layer_freq = {freq!r} is not a positive integer or a per-layer list")
    return tuple(i % freq == 0 for i in range(layers))


def _moe_layer_write(cfg):
    pattern = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    return 1 if all(pattern) else pattern


def _sigmoid(cfg) -> bool:
    return cfg.router_score == "sigmoid"


_GPT, _ROPE, _MOE, _MLA, _MAMBA = (_gpt, _gpt_args), (_rope, _rope_args), (_moe, _moe_args), (_mla, _mla_args), \
    (_mamba, _mamba_args)
_LN1P = (_layernorm_1p, _layernorm_1p_args)
_RMSNORM = (lambda c: not _layernorm_1p(c), lambda a: not _layernorm_1p_args(a))
_SWIGLU = (lambda c: _gpt(c) and not _layernorm_1p(c), lambda a: _gpt_args(a) and not _layernorm_1p_args(a))
_SQUARED_RELU = (lambda c: _mamba(c) or _layernorm_1p(c), lambda a: _mamba_args(a) or _layernorm_1p_args(a))
_GDN, _NOT_GDN = (_gdn, _gdn_args), (_not_gdn, _not_gdn_args)
_RMSNORM_NOT_GDN = (lambda c: not _layernorm_1p(c) and _not_gdn(c),
                    lambda a: not _layernorm_1p_args(a) and _not_gdn_args(a))

ROWS: tuple[Arg, ...] = (
    Arg("num_layers", ("num_layers",)),
    # Multi-token-prediction layers (DeepSeek-V3, GLM-4.5): Megatron-LM's --mtp-num-layers, None when there are none.
    Arg("mtp_layers", ("mtp_num_layers",), write=lambda c: c.mtp_layers or None, read=lambda v, a: v or 0),
    Arg("hidden_size", ("hidden_size",)),
    Arg("ffn_hidden_size", ("ffn_hidden_size",)),
    Arg("num_attention_heads", ("num_attention_heads",)),
    Arg(None, ("group_query_attention",), write=lambda c: c.num_query_groups != c.num_attention_heads),
    Arg("num_query_groups", ("num_query_groups",), default=1, read=_gqa_read),
    Arg("kv_channels", ("kv_channels",), read=lambda v, a: v or a.hidden_size // a.num_attention_heads),
    Arg("max_position_embeddings", ("max_position_embeddings",), default=4096),
    Arg("norm_epsilon", ("layernorm_epsilon", "norm_epsilon"), default=1e-5, read=lambda v, a: float(v)),
    Arg("tie_word_embeddings", ("untie_embeddings_and_output_weights",), default=False,
        write=lambda c: not c.tie_word_embeddings, read=lambda v, a: not v),
    Arg("attention_bias", ("add_qkv_bias",), default=False, read=lambda v, a: bool(v)),
    # The norms (RMSNorm, Nemotron-4's LayerNorm with 1 + weight) and the ungated squared-ReLU MLP (Nemotron-4 and
    # Nemotron-H); the Fixed rows below hold every other family to RMSNorm and SwiGLU.
    Arg("normalization", ("normalization",), default="LayerNorm"),
    Arg("layernorm_zero_centered_gamma", ("layernorm_zero_centered_gamma", "apply_layernorm_1p"), default=False,
        read=lambda v, a: bool(v)),
    Arg("squared_relu", ("squared_relu",), default=False, read=lambda v, a: bool(v), on=_SQUARED_RELU),
    # HF's window of W tokens is the query and the W - 1 before it; Megatron's (left, right) counts those beside it.
    Arg("sliding_window", ("window_size",), write=lambda c: (c.sliding_window - 1, 0) if c.sliding_window else None,
        read=lambda v, a: _window_read(v)),
    # Rotary embedding of ordinary attention (MLA's follows below; Nemotron-H has none).
    Arg("rope_theta", ("rotary_base",), default=10000, read=lambda v, a: float(v), on=_ROPE),
    Arg("rotary_percent", ("rotary_percent",), default=1.0, read=lambda v, a: float(v), on=_ROPE),
    Arg("rotary_interleaved", ("rotary_interleaved",), default=False, read=lambda v, a: bool(v), on=_ROPE),
    Arg("rope_scaling", ("use_rope_scaling",), default=False, write=_llama3_write, read=_llama3_read,
        on=(_gpt, _rope_args)),
    Arg(None, ("rope_scaling_factor",), write=lambda c: float(c.rope_scaling["factor"]) if _llama3_write(c) else 8.0,
        on=(_gpt, _rope_args)),
    # Mixture of experts.
    Arg("num_experts", ("num_experts",), default=0, write=lambda c: c.num_experts or None,
        read=lambda v, a: int(v or 0)),
    Arg("moe_ffn_hidden_size", ("moe_ffn_hidden_size",), read=lambda v, a: v or a.ffn_hidden_size, on=_MOE),
    Arg("moe_topk", ("moe_router_topk",), default=2, on=_MOE),
    Arg("norm_topk_prob", ("moe_router_pre_softmax",), default=False,
        write=lambda c: False if _sigmoid(c) else not c.norm_topk_prob,
        read=lambda v, a: True if _get(a, ("moe_router_score_function",), "softmax") == "sigmoid" else not v, on=_MOE),
    Arg("router_score", ("moe_router_score_function",), default="softmax", on=_MOE),
    Arg("moe_layers", ("moe_layer_freq",), default=1, write=_moe_layer_write, read=_moe_layer_read, on=_MOE),
    Arg("shared_expert_ffn_hidden_size", ("moe_shared_expert_intermediate_size",), default=0,
        write=lambda c: c.shared_expert_ffn_hidden_size or None, on=_MOE),
    Arg("router_expert_bias", ("moe_router_enable_expert_bias",), default=False, on=_MOE),
    Arg("router_groups", ("moe_router_num_groups",),
        write=lambda c: c.router_groups if c.router_groups > 1 else None,
        read=lambda v, a: v or (1 if _get(a, ("moe_router_score_function",), "") == "sigmoid" else 0), on=_MOE),
    Arg("router_group_topk", ("moe_router_group_topk",),
        write=lambda c: c.router_group_topk if c.router_groups > 1 else None,
        read=lambda v, a: v or (1 if _get(a, ("moe_router_score_function",), "") == "sigmoid" else 0), on=_MOE),
    Arg("routed_scaling_factor", ("moe_router_topk_scaling_factor",), default=1.0,
        write=lambda c: c.routed_scaling_factor if _sigmoid(c) or c.routed_scaling_factor != 1.0 else None,
        read=lambda v, a: float(v), on=_MOE),
    # Multi-latent attention (DeepSeek-V3) and its YaRN rope.
    Arg(None, ("multi_latent_attention",), write=lambda c: c.mla),
    Arg("q_lora_rank", ("q_lora_rank",), default=0, write=lambda c: c.q_lora_rank or None, on=_MLA),
    Arg("kv_lora_rank", ("kv_lora_rank",), on=_MLA),
    Arg("qk_nope_head_dim", ("qk_head_dim",), on=_MLA),
    Arg("qk_rope_head_dim", ("qk_pos_emb_head_dim",), on=_MLA),
    Arg("v_head_dim", ("v_head_dim",), on=_MLA),
    Arg("rope_theta", ("rotary_base",), default=10000, read=lambda v, a: float(v), on=_MLA),
    Arg("rope_scaling", ("rope_type",), default="rope", write=lambda c: "yarn" if _rope_type(c) == "yarn" else "rope",
        read=_yarn_read, on=_MLA),
    *(Arg(None, (name,), write=_yarn(key, default), on=_MLA) for key, (name, default) in YARN.items()),
    # Mamba hybrids (Nemotron-H, Mamba-2): the layer pattern and the mixer.
    Arg("layer_kinds", ("hybrid_override_pattern",), write=lambda c: "".join(c.layer_kinds), read=lambda v, a: tuple(v), on=_MAMBA),
    Arg("mamba_state_dim", ("mamba_state_dim",), default=128, on=_MAMBA),
    Arg("mamba_head_dim", ("mamba_head_dim",), default=64, on=_MAMBA),
    Arg("mamba_num_groups", ("mamba_num_groups",), default=8, on=_MAMBA),
    Arg("mamba_num_heads", ("mamba_num_heads",), read=lambda v, a: v or 2 * a.hidden_size // _get(
        a, ("mamba_head_dim",), 64), on=_MAMBA),
    Arg("mamba_conv_kernel", ("mamba_conv_kernel",), default=4, on=_MAMBA),
    # Qwen3-Next's gated DeltaNet layers (Megatron-Core's experimental_attention_variant "gated_delta_net").
    Arg("linear_layers", ("linear_attention_freq",), write=lambda c: [int(x) for x in c.linear_layers],
        read=_linear_layers_read, on=_GDN),
    Arg("linear_num_key_heads", ("linear_num_key_heads",), default=16, on=_GDN),
    Arg("linear_num_value_heads", ("linear_num_value_heads",), default=32, on=_GDN),
    Arg("linear_key_head_dim", ("linear_key_head_dim",), default=128, on=_GDN),
    Arg("linear_value_head_dim", ("linear_value_head_dim",), default=128, on=_GDN),
    Arg("linear_conv_kernel", ("linear_conv_kernel_dim",), default=4, on=_GDN),
)


FACTS = tuple(dict.fromkeys(r.fact for r in ROWS if r.fact))  # in table order: sizes first


def _window_read(v):
    if v is None:
        return None
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and v[1] == 0 and isinstance(v[0], int) and v[0] >= 0):
        raise ConversionError(f"args.window_size = {v!r}: only a causal window (w, 0) has an HF equivalent "
                              f"(sliding_window w + 1)")
    return v[0] + 1


# Args that change what the model computes and that no supported HF family expresses, at the value the families
# need. Megatron-LM's defaults are given for checkpoints that lack the arg (older releases, other tools).
FIXED: tuple[Fixed, ...] = (
    Fixed(("normalization",), "RMSNorm", "LayerNorm", "the HF families but Nemotron-4 use RMSNorm (Nemotron-4: "
          "LayerNorm with --apply-layernorm-1p and --squared-relu)", on=_RMSNORM),
    Fixed(("layernorm_zero_centered_gamma", "apply_layernorm_1p"), False, False, "HF's RMSNorm scales by the weight "
          "itself, not 1 + weight", on=_RMSNORM_NOT_GDN),
    Fixed(("apply_residual_connection_post_layernorm",), False, False, "HF's residual is taken before the norm"),
    Fixed(("add_bias_linear",), False, True, "the HF families have no biases on linear layers (only q/k/v biases, "
          "--add-qkv-bias)"),
    Fixed(("swiglu",), True, False, "the HF families' MLP is SwiGLU", on=_SWIGLU),
    Fixed(("squared_relu",), False, False, "the HF GPT families' MLP is SwiGLU", on=_SWIGLU),
    Fixed(("swiglu",), False, False, "Nemotron-4's MLP is squared ReLU without a gate", on=_LN1P),
    Fixed(("position_embedding_type",), "rope", "learned_absolute", "the HF GPT families use rotary embeddings",
          on=_GPT),
    Fixed(("position_embedding_type",), "none", "learned_absolute", "Nemotron-H / Mamba-2 have no position "
          "embedding", on=_MAMBA),
    Fixed(("swiglu",), False, False, "Nemotron-H's MLP is squared ReLU", on=_MAMBA),
    Fixed(("openai_gelu",), False, False, "the HF families use no GeLU"),
    Fixed(("quick_geglu",), False, False, "the HF families use no GeGLU"),
    Fixed(("glu_linear_offset",), 0.0, 0.0, "HF's SwiGLU adds no offset to the linear half", accept=(0,)),
    Fixed(("activation_func_clamp_value",), None, None, "HF's activation is not clamped"),
    Fixed(("rotary_percent",), 1.0, 1.0, "DeepSeek-V3 rotates the whole rope head dimension", accept=(1,), on=_MLA),
    Fixed(("rotary_interleaved",), False, False, "Megatron-Core's multi-latent attention rotates de-interleaved "
          "channels", on=_MLA),
    Fixed(("rotary_seq_len_interpolation_factor",), None, None, "HF has no position interpolation factor", on=_GPT),
    Fixed(("no_rope_freq",), None, None, "the HF families rotate in every layer"),
    Fixed(("window_attn_skip_freq",), None, None, "the HF families use one attention window for every layer"),
    Fixed(("qk_l2_norm",), False, False, "the HF families do not L2-normalise q and k"),
    Fixed(("attention_output_gate",), False, False, "the HF families have no attention output gate", on=_NOT_GDN),
    Fixed(("attention_output_gate",), True, False, "Qwen3-Next's attention gates its output", on=_GDN),
    Fixed(("softmax_type",), "vanilla", "vanilla", "the HF families use a plain softmax"),
    Fixed(("experimental_attention_variant",), None, None, "the HF families use plain attention", on=_NOT_GDN),
    Fixed(("experimental_attention_variant",), "gated_delta_net", None, "Qwen3-Next's linear attention is the gated "
          "DeltaNet", on=_GDN),
    Fixed(("linear_attention_freq",), None, None, "the HF GPT families have no linear-attention layers",
          on=_NOT_GDN),
    Fixed(("heterogeneous_layers_config_path",), None, None, "the HF families have identical layers"),
    Fixed(("heterogeneous_layers_config_encoded_json",), None, None, "the HF families have identical layers"),
    Fixed(("moe_latent_size",), None, None, "the HF MoE families have no latent expert projection"),
    Fixed(("mrope_section",), None, None, "the HF GPT families use 1-D rotary positions"),
)


def write(cfg) -> dict:
    """The architecture args of `cfg`, under every name Megatron-LM releases have read them by."""
    out = {}
    for row in ROWS:
        if row.on[0](cfg):
            value = row.write(cfg) if row.write else getattr(cfg, row.fact)
            out.update(dict.fromkeys(row.names, value))
    for row in FIXED:
        if row.on[0](cfg):
            out.update(dict.fromkeys(row.names, row.value))
    return out


# GPT-OSS's own attention and MLP flags (megatron_args._gpt_oss_args writes them; its sinks, softmax_type
# "learnable", mark its args): the rows above that they replace, and the facts they state instead.
GPT_OSS_ARGS = ("add_bias_linear", "swiglu", "quick_geglu", "glu_linear_offset", "activation_func_clamp_value",
                "softmax_type", "window_attn_skip_freq", "position_embedding_type")
GPT_OSS_FACTS = ("rope_scaling", "sliding_window")


def gpt_oss(args: Namespace) -> bool:
    return _get(args, ("softmax_type",), "vanilla") == "learnable"


def check_fixed(args: Namespace, where: str) -> None:
    """Refuse, naming it, the first arg (or Megatron-LM's default for a missing one) that the families cannot
    express."""
    for row in FIXED:
        if not row.on[1](args) or (gpt_oss(args) and row.names[0] in GPT_OSS_ARGS):
            continue
        value = _get(args, row.names, _ABSENT)
        if value is _ABSENT:
            value = row.default if not any(hasattr(args, n) for n in row.names) else None
        if value != row.value and value not in row.accept and not (row.value is None and value is None):
            name = next((n for n in row.names if hasattr(args, n)), row.names[0])
            raise ConversionError(f"{where}: args.{name} = {value!r} cannot be converted: {row.why} "
                                  f"(needs {row.value!r})")


def read(args: Namespace, where: str) -> dict:
    """The model facts the args state (ModelConfig fields), after refusing any arg the families cannot express.
    A fact of a group the args do not use (MoE fields of a dense model) is left out: ModelConfig's default."""
    check_fixed(args, where)
    facts = {}
    for row in ROWS:
        if row.fact is None or not row.on[1](args):
            continue
        value = _get(args, row.names, row.default)
        facts[row.fact] = row.read(value, args) if row.read else value
    if facts.get("moe_layers") is not None and not facts.get("num_experts"):
        facts.pop("moe_layers")
    return facts
