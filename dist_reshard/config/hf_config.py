"""The model facts the converter needs, read from an HF `config.json` of either generation.

transformers 5 writes `rope_parameters` and `dtype`; older releases (most published checkpoints) write
top-level `rope_theta`, `rope_scaling` and `torch_dtype`. Both are read here with plain json so that
planning needs no transformers import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..base.dtypes import HF_DTYPE_FLAGS
from ..base.errors import ConversionError
from .llava_config import llava_config



@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    rope_scaling: dict | None  # the HF rope_scaling / rope_parameters dict when it is not the default
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: str | None  # "bf16" | "fp16" | "fp32" | None
    sliding_window: int | None
    raw: dict
    rotary_percent: float = 1.0  # the share of each head's channels rotated (HF `partial_rotary_factor`)
    # The norms: RMSNorm, or LayerNorm with a bias (Nemotron-4); zero-centred gamma: it scales by 1 + weight.
    normalization: str = "RMSNorm"
    layernorm_zero_centered_gamma: bool = False
    rotary_interleaved: bool = False  # rotary pairs are adjacent channels (Ernie-4.5), not the head's two halves
    # Mixture of experts (num_experts 0: dense). moe_layers[i] says whether layer i routes to experts.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    shared_expert_ffn_hidden_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()
    # DeepSeek-style routing: sigmoid scores, a selection-only bias per expert, group-limited top-k, a
    # constant scale on the combined weights.
    router_score: str = "softmax"  # "softmax" | "sigmoid"
    router_expert_bias: bool = False
    router_groups: int = 0
    router_group_topk: int = 0
    routed_scaling_factor: float = 1.0
    # Multi-latent attention (kv_lora_rank 0: ordinary attention). q_lora_rank 0: queries from q_proj.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Further layer stacks of a composite model, by name (LLaVA's "vision" encoder), each its own config.
    stacks: tuple[tuple[str, "ModelConfig"], ...] = ()

    def stack(self, name: str) -> "ModelConfig":
        return dict(self.stacks)[name]
    # Hybrid (Mamba) stacks: Megatron's pattern symbol per layer ("M" mamba, "*" attention, "-" MLP); empty
    # for GPT stacks. The Mamba-2 mixer: state size, head size, heads, groups of B/C, conv kernel width.
    layer_kinds: tuple[str, ...] = ()
    mamba_state_dim: int = 0
    mamba_head_dim: int = 0
    mamba_num_heads: int = 0
    mamba_num_groups: int = 0
    mamba_conv_kernel: int = 0
    squared_relu: bool = False  # the MLP is up -> relu(x)^2 -> down (Nemotron-H, Nemotron-4), not SwiGLU
    # A GPT model laid out as a MambaModel (attention and MLP in separate layers): the HF layer each Megatron
    # layer comes from; empty when Megatron and HF number layers alike.
    hf_layers: tuple[int, ...] = ()
    # Multi-token-prediction layers converted (HF `model.layers.{num_layers + k}.`, Megatron `mtp_num_layers`):
    # counted from an HF folder's tensors (hf_source), since transformers writes `num_nextn_predict_layers` 1
    # into configs whose checkpoints have none; 0 from config.json alone.
    mtp_layers: int = 0
    # Qwen3-Next: linear_layers[i] says whether layer i is a gated DeltaNet (linear attention) layer, else
    # gated softmax attention; the DeltaNet's key/value heads, their sizes and its depthwise conv width. Empty
    # for every other family (their attention is plain, their norms scale by the weight itself).
    linear_layers: tuple[bool, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0

    @property
    def gated_delta_net(self) -> bool:
        return bool(self.linear_layers)

    def mixer_kind(self, layer: int) -> str:
        """A layer's token mixer, as family rules select it (`Rule.mixer`): "linear" or "attention"."""
        return "linear" if self.linear_layers and self.linear_layers[layer] else "attention"

    @property
    def linear_qkvz_parts(self) -> tuple[int, ...]:
        """Megatron's gated DeltaNet in_proj sections: query, key, value, z, beta, alpha."""
        qk = self.linear_num_key_heads * self.linear_key_head_dim
        v = self.linear_num_value_heads * self.linear_value_head_dim
        return (qk, qk, v, v, self.linear_num_value_heads, self.linear_num_value_heads)

    @property
    def linear_conv_parts(self) -> tuple[int, ...]:
        """Channel sections of the gated DeltaNet's depthwise conv1d: query, key, value."""
        return self.linear_qkvz_parts[:3]

    def hf_layer(self, layer: int) -> int:
        return self.hf_layers[layer] if self.hf_layers else layer

    def layer_kind(self, layer: int) -> str:
        """What a layer holds, as family rules select it (`Rule.where`): a hybrid pattern symbol, else
        "moe" or "dense"."""
        if self.layer_kinds:
            return self.layer_kinds[layer]
        return "moe" if self.is_moe_layer(layer) else "dense"

    @property
    def hybrid(self) -> bool:
        return bool(self.layer_kinds)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_in_proj_parts(self) -> tuple[int, ...]:
        """Row sections of the mixer's in_proj: z, x, B, C, dt."""
        gs = self.mamba_num_groups * self.mamba_state_dim
        return (self.mamba_d_inner, self.mamba_d_inner, gs, gs, self.mamba_num_heads)

    @property
    def mamba_conv_parts(self) -> tuple[int, ...]:
        """Channel sections of the mixer's depthwise conv1d: x, B, C."""
        gs = self.mamba_num_groups * self.mamba_state_dim
        return (self.mamba_d_inner, gs, gs)

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def layers_alike(self) -> bool:
        """Every layer has the same modules (all dense or all MoE): Megatron's torch_dist then stacks the
        layers on a leading axis; otherwise it keys each layer `decoder.layers.{g}.`. Megatron's MambaStack
        always keys each layer, whatever its pattern."""
        if self.hybrid or self.gated_delta_net:
            return False
        return len({self.is_moe_layer(i) for i in range(self.num_layers)}) == 1

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def q_lora(self) -> bool:
        return self.q_lora_rank > 0

    @property
    def siglip(self) -> bool:
        """A composite model whose vision stack is a SigLIP tower (LLaVA's rows select by it, `Rule.when`)."""
        return bool(self.stacks) and self.stack("vision").model_type == "siglip_vision_model"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def flag(self, name: str) -> bool:
        """A feature a family rule may depend on (`Rule.when`); "!name" is its negation."""
        negate = name.startswith("!")
        return bool(getattr(self, name.lstrip("!"))) != negate

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


# Composite image-text models: a language model config plus a vision encoder's (see llava_config.py).
MULTIMODAL = ("LlavaForConditionalGeneration",)

_REQUIRED = object()


def _int(cfg: dict, key: str, path: str, default=_REQUIRED, minimum: int = 1) -> int:
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{path}: missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConversionError(f"{path}: field {key!r} = {value!r} is not an integer >= {minimum}")
    return value


def _float(cfg: dict, key: str, path: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConversionError(f"{path}: field {key!r} = {value!r} is not a number")
    return float(value)


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: config.json not found (needed to detect the model family)") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    return config_from_dict(cfg, path)


def config_from_dict(cfg: dict, path: str = "config.json") -> ModelConfig:
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: top level is not a JSON object")
    hybrid = {}
    if cfg.get("model_type") in HYBRID_MODEL_TYPES:
        raw = cfg
        cfg, hybrid = _hybrid_fields(cfg, path)
    archs = cfg.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ConversionError(f"{path}: no 'architectures' list, cannot detect the model family")
    if archs[0] in MULTIMODAL:
        return llava_config(cfg, path, config_from_dict)
    heads = _int(cfg, "num_attention_heads", path)
    hidden = _int(cfg, "hidden_size", path)
    rope_params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    rope_theta = _float(cfg, "rope_theta", path, _float(rope_params, "rope_theta", path, 10000.0))
    scaling = cfg.get("rope_scaling") or rope_params or None
    if scaling is not None and not isinstance(scaling, dict):
        raise ConversionError(f"{path}: field 'rope_scaling' = {scaling!r} is not an object")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    num_layers = _int(cfg, "num_hidden_layers", path)
    # transformers writes Nemotron-H's MoE defaults (n_routed_experts ...) into every config; they count only
    # when some layer is MoE.
    moe = {} if hybrid and "E" not in hybrid["layer_kinds"] else _moe_fields(cfg, path, num_layers)
    mla = _mla_fields(cfg, path)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    nemotron = _nemotron_fields(cfg, path)
    norm_epsilon = nemotron.pop("norm_epsilon") if nemotron else _float(cfg, "rms_norm_eps", path, 1e-6)
    rotary_default = nemotron.pop("rotary_percent") if nemotron else 1.0
    return ModelConfig(
        architecture=archs[0],
        model_type=str(cfg.get("model_type", "")),
        num_layers=num_layers,
        hidden_size=hidden,
        # Qwen3.5-MoE has no dense MLP and no intermediate_size; Megatron's ffn_hidden_size then sizes nothing.
        ffn_hidden_size=_int(cfg, "moe_intermediate_size" if cfg.get("model_type") == "qwen3_5_moe_text"
                             else "intermediate_size", path),
        num_attention_heads=heads,
        num_query_groups=_int(cfg, "num_key_value_heads", path, default=heads),
        kv_channels=_int(cfg, "head_dim", path, default=hidden // heads),
        vocab_size=_int(cfg, "vocab_size", path),
        max_position_embeddings=_int(cfg, "max_position_embeddings", path, default=4096),
        norm_epsilon=norm_epsilon,
        rope_theta=rope_theta,
        rope_scaling=dict(scaling) if scaling else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=_attention_bias(cfg),
        dtype=HF_DTYPE_FLAGS.get(dtype) if isinstance(dtype, str) else None,
        sliding_window=window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None,
        raw=raw if hybrid else cfg,
        rotary_percent=_float(cfg, "partial_rotary_factor", path, _float(rope_params, "partial_rotary_factor", path,
                                                                         rotary_default)),
        **nemotron,
        rotary_interleaved=cfg.get("model_type") == "ernie4_5_moe",
        **moe,
        **mla,
        **hybrid,
        **_linear_attention_fields(cfg, path, num_layers),
    )


def _nemotron_fields(cfg: dict, path: str) -> dict:
    """Nemotron-4 / Minitron: `NemotronLayerNorm1P` (LayerNorm with a bias, scaling by 1 + weight) under `norm_eps`,
    an MLP up -> `hidden_act` -> down (relu2: squared ReLU), and transformers' default partial rotary of 0.5."""
    if cfg.get("model_type") != "nemotron":
        return {}
    return dict(normalization="LayerNorm", layernorm_zero_centered_gamma=True,
                squared_relu=cfg.get("hidden_act", "relu2") == "relu2", norm_epsilon=_float(cfg, "norm_eps", path, 1e-5),
                rotary_percent=0.5)
def _linear_attention_fields(cfg: dict, path: str, num_layers: int) -> dict:
    """Qwen3-Next's gated DeltaNet layers: `layer_types` (transformers 5) or, in older configs,
    `full_attention_interval` N (layer i is full attention iff (i + 1) % N == 0)."""
    if cfg.get("model_type") not in GATED_DELTA_NET_MODEL_TYPES:
        return {}
    types = cfg.get("layer_types")
    if types is None:
        n = _int(cfg, "full_attention_interval", path, default=4)
        types = ["full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConversionError(f"{path}: field 'layer_types' = {types!r} is not a list of {num_layers} layer types")
    unknown = [t for t in types if t not in ("linear_attention", "full_attention")]
    if unknown:
        raise ConversionError(f"{path}: layer_types holds {unknown[0]!r}; Qwen3-Next layers are linear_attention "
                              f"or full_attention")
    # Its RMSNorms (all but the DeltaNet's gated output norm, which its rule shifts) scale by 1 + weight.
    return dict(layernorm_zero_centered_gamma=True, linear_layers=tuple(t == "linear_attention" for t in types),
                linear_num_key_heads=_int(cfg, "linear_num_key_heads", path),
                linear_num_value_heads=_int(cfg, "linear_num_value_heads", path),
                linear_key_head_dim=_int(cfg, "linear_key_head_dim", path),
                linear_value_head_dim=_int(cfg, "linear_value_head_dim", path),
                linear_conv_kernel=_int(cfg, "linear_conv_kernel_dim", path))


def _attention_bias(cfg: dict) -> bool:
    """Whether q/k/v carry biases: always in Qwen2, by `qkv_bias` (default on) in Qwen2-MoE, else by
    `attention_bias`."""
    if cfg.get("model_type") == "qwen2":
        return True
    if cfg.get("model_type") == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))


def _mla_fields(cfg: dict, path: str) -> dict:
    """DeepSeek-V2/V3 multi-latent attention (Kimi-K2 and Moonlight share it). Multi-token-prediction layers
    are found by their tensors: transformers writes `num_nextn_predict_layers` 1 into every such config."""
    if not cfg.get("kv_lora_rank"):
        return {}
    return dict(
        q_lora_rank=_int(cfg, "q_lora_rank", path, default=0, minimum=0),
        kv_lora_rank=_int(cfg, "kv_lora_rank", path),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim", path),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim", path),
        v_head_dim=_int(cfg, "v_head_dim", path),
    )


def _moe_fields(cfg: dict, path: str, num_layers: int) -> dict:
    """Expert count, sizes and the MoE/dense pattern under the names Mixtral and the Qwen MoEs use.

    Mixtral: `num_local_experts`, expert size `intermediate_size`, every layer MoE, top-k renormalised.
    Qwen2/3-MoE: `num_experts` (transformers 5 also writes `num_local_experts`), `moe_intermediate_size`,
    layer i is MoE iff i is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0.
    DeepSeek-V3: `n_routed_experts`, `n_shared_experts` experts' worth of shared expert, layer i is MoE iff
    i >= `first_k_dense_replace` and i % `moe_layer_freq` == 0.
    """
    if cfg.get("n_routed_experts") is not None:
        return _deepseek_moe_fields(cfg, path, num_layers)
    if cfg.get("model_type") == "ernie4_5_moe":
        return _ernie_moe_fields(cfg, path, num_layers)
    key = "num_local_experts" if cfg.get("num_local_experts") is not None else "num_experts"
    experts = _int(cfg, key, path, default=0, minimum=0)
    if not experts:
        return {}
    # Qwen3.5-MoE's config class has neither field (every layer routes), whatever a config.json states.
    every_layer = cfg.get("model_type") == "qwen3_5_moe_text"
    step = 1 if every_layer else _int(cfg, "decoder_sparse_step", path, default=1)
    dense_only = [] if every_layer else cfg.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in dense_only):
        raise ConversionError(f"{path}: field 'mlp_only_layers' = {dense_only!r} is not a list of layer indices")
    moe_ffn_key = "moe_intermediate_size" if cfg.get("moe_intermediate_size") is not None else "intermediate_size"
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=_int(cfg, moe_ffn_key, path),
        moe_topk=_int(cfg, "num_experts_per_tok", path, default=2),
        shared_expert_ffn_hidden_size=_int(cfg, "shared_expert_intermediate_size", path, default=0, minimum=0),
        # Mixtral always renormalises the top-k weights (GPT-OSS takes its softmax over the top-k logits, the
        # same); the Qwens only when asked, but Qwen3.5-MoE, whose config has no norm_topk_prob, always.
        norm_topk_prob=every_layer or bool(cfg.get("norm_topk_prob",
                                                   cfg.get("model_type") in ("mixtral", "gpt_oss"))),
        moe_layers=tuple(i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _deepseek_moe_fields(cfg: dict, path: str, num_layers: int) -> dict:
    experts = _int(cfg, "n_routed_experts", path)
    ffn = _int(cfg, "moe_intermediate_size", path)
    first_dense = _int(cfg, "first_k_dense_replace", path, default=0, minimum=0)
    freq = _int(cfg, "moe_layer_freq", path, default=1)
    # DeepSeek-V2 (transformers 5) always scores by softmax and never renormalises; its `greedy` top-k ignores
    # the expert groups (no group limit: 0 groups, as Megatron's softmax router reads an absent arg).
    v2 = cfg.get("model_type") == "deepseek_v2"
    scoring = cfg.get("scoring_func", "softmax" if v2 else "sigmoid")
    method = cfg.get("topk_method", "greedy" if v2 else "noaux_tc")
    grouped = not v2 or (method != "greedy" and _int(cfg, "n_group", path, default=1) > 1)
    if scoring not in ("sigmoid", "softmax"):
        raise ConversionError(f"{path}: field 'scoring_func' = {scoring!r} is not 'sigmoid' or 'softmax'")
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=ffn,
        moe_topk=_int(cfg, "num_experts_per_tok", path),
        shared_expert_ffn_hidden_size=_int(cfg, "n_shared_experts", path, default=0, minimum=0) * ffn,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", not v2)),
        moe_layers=tuple(i >= first_dense and i % freq == 0 for i in range(num_layers)),
        router_score=scoring,
        router_expert_bias=method == "noaux_tc",
        router_groups=_int(cfg, "n_group", path, default=1) if grouped else 0,
        router_group_topk=_int(cfg, "topk_group", path, default=1) if grouped else 0,
        routed_scaling_factor=_float(cfg, "routed_scaling_factor", path, 1.0),
    )


def _ernie_moe_fields(cfg: dict, path: str, num_layers: int) -> dict:
    """Ernie-4.5: `moe_num_experts` experts of `moe_intermediate_size`, `moe_num_shared_experts` experts' worth of
    shared expert, top `moe_k` of a softmax, always renormalised; layer i is MoE iff `moe_layer_start_index` <=
    i <= `moe_layer_end_index` (-1: the last layer) and (i + 1) % `moe_layer_interval` == 0. Ernie-4.5-VL writes
    lists (text and vision experts) into these fields."""
    for key in ("moe_num_experts", "moe_intermediate_size", "moe_layer_start_index", "moe_layer_end_index"):
        if isinstance(cfg.get(key), list):
            raise ConversionError(f"{path}: field {key!r} = {cfg[key]!r} is a list (Ernie-4.5-VL's text and vision "
                                  f"experts); only the text model (one integer) is supported")
    ffn = _int(cfg, "moe_intermediate_size", path)
    start = _int(cfg, "moe_layer_start_index", path, default=1, minimum=0)
    end = cfg.get("moe_layer_end_index", -1)
    end = num_layers - 1 if end == -1 else _int(cfg, "moe_layer_end_index", path, minimum=0)
    interval = _int(cfg, "moe_layer_interval", path, default=1)
    return dict(
        num_experts=_int(cfg, "moe_num_experts", path),
        moe_ffn_hidden_size=ffn,
        moe_topk=_int(cfg, "moe_k", path),
        shared_expert_ffn_hidden_size=_int(cfg, "moe_num_shared_experts", path, default=0, minimum=0) * ffn,
        norm_topk_prob=True,
        moe_layers=tuple(start <= i <= end and (i + 1) % interval == 0 for i in range(num_layers)),
    )


# Hybrid families: Nemotron-H (Mamba-2, attention and MLP layers by a pattern) and Mamba-2 (mamba only).
# The HF architecture each family is written as, and its model_type.
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3",
               "DeepseekV2ForCausalLM": "deepseek_v2", "Glm4MoeForCausalLM": "glm4_moe", "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
               "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
               "Qwen3NextForCausalLM": "qwen3_next", "Qwen3_5ForCausalLM": "qwen3_5_text",
               "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text", "NemotronHForCausalLM": "nemotron_h", "Mamba2ForCausalLM": "mamba2",
               "NemotronForCausalLM": "nemotron"}

HYBRID_MODEL_TYPES = ("nemotron_h", "mamba2")
# Gated DeltaNet hybrids: Qwen3-Next and the Qwen3.5 text models.
GATED_DELTA_NET_MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
_NEMOTRON_H_KINDS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                     "mlp": "-", "moe": "E"}


def _hybrid_fields(cfg: dict, path: str) -> tuple[dict, dict]:
    """The config with the GPT field names the rest of this reader expects, and the hybrid facts.

    Nemotron-H states its layers as `layers_block_type` (older configs: `hybrid_override_pattern`, Megatron's
    own symbols) and leaves `num_hidden_layers` implied; Mamba-2 has no attention or MLP fields at all, so
    those get placeholders Megatron's argument checks accept (heads = the mamba heads)."""
    if cfg.get("model_type") == "mamba2":
        layers = _int(cfg, "num_hidden_layers", path)
        kinds = "M" * layers
        heads, head_dim, state = (_int(cfg, "num_heads", path), _int(cfg, "head_dim", path),
                                  _int(cfg, "state_size", path))
        hidden = _int(cfg, "hidden_size", path)
        if heads * head_dim != int(cfg.get("expand", 2) * hidden):
            raise ConversionError(f"{path}: num_heads {heads} x head_dim {head_dim} is not expand x hidden_size "
                                  f"({cfg.get('expand', 2)} x {hidden}); transformers' Mamba-2 mixer would carry "
                                  f"extra MLP rows in in_proj, which Megatron-Core's mixer has no place for")
        normal = dict(cfg, num_attention_heads=heads, intermediate_size=4 * hidden,
                      rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5))
        groups, squared = _int(cfg, "n_groups", path), False
    else:
        types = cfg.get("layers_block_type")
        if isinstance(types, list) and types:
            unknown = [t for t in types if t not in _NEMOTRON_H_KINDS]
            if unknown:
                raise ConversionError(f"{path}: layers_block_type holds {unknown[0]!r}; known: "
                                      f"{', '.join(_NEMOTRON_H_KINDS)}")
            kinds = "".join(_NEMOTRON_H_KINDS[t] for t in types)
        elif isinstance(cfg.get("hybrid_override_pattern"), str):
            kinds = cfg["hybrid_override_pattern"]
        else:
            raise ConversionError(f"{path}: neither layers_block_type nor hybrid_override_pattern says which "
                                  f"layer is which")
        bad = sorted(set(kinds) - set("M*-E"))
        if bad:
            raise ConversionError(f"{path}: hybrid layer symbol {bad[0]!r} is not one of Megatron's M, *, -, E")
        heads, head_dim, state = (_int(cfg, "mamba_num_heads", path), _int(cfg, "mamba_head_dim", path),
                                  _int(cfg, "ssm_state_size", path))
        # transformers' field defaults and the older `mamba_*` aliases its config still accepts.
        normal = dict(cfg, num_hidden_layers=len(kinds), rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                      rope_theta=None, rope_scaling=None, rope_parameters=None, head_dim=cfg.get("head_dim", 128),
                      n_groups=cfg.get("mamba_n_groups", cfg.get("n_groups")),
                      conv_kernel=cfg.get("mamba_d_conv", cfg.get("conv_kernel")),
                      use_conv_bias=cfg.get("mamba_conv_bias", cfg.get("use_conv_bias", True)))
        groups = _int(normal, "n_groups", path)
        squared = cfg.get("mlp_hidden_act", "relu2") == "relu2"
    return normal, dict(layer_kinds=tuple(kinds), mamba_state_dim=state, mamba_head_dim=head_dim,
                        mamba_num_heads=heads, mamba_num_groups=groups,
                        mamba_conv_kernel=_int(normal, "conv_kernel", path, default=4), squared_relu=squared)
