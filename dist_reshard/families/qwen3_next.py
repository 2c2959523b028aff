"""Qwen3-Next (`Qwen3NextForCausalLM`) against Megatron-Core's GPTModel built by
`get_transformer_block_with_experimental_attention_variant_spec` (`experimental_attention_variant="gated_delta_net"`).

- Layers are gated DeltaNet (`linear_attention`) or gated softmax attention (`full_attention`) by `layer_types`,
  Megatron's `linear_attention_freq` as a per-layer list; rows select them by `mixer`. Every layer routes to
  experts with a sigmoid-gated shared expert (Qwen2-MoE's rows), but those in `mlp_only_layers` (dense SwiGLU).
- The gated DeltaNet (`self_attention.` in Megatron): `in_proj` = HF `in_proj_qkvz` + `in_proj_ba` regrouped
  (`Kind.GDN_IN_PROJ`), its norm fused in (`in_proj.layer_norm_weight`); conv1d channels [q; k; v] and A_log,
  dt_bias by heads split by TP as Megatron's mixer holds them; torch_dist stores in_proj and conv1d per section
  (`in_proj.weight.query`, ..., `conv1d.weight.value`), as `GatedDeltaNet.sharded_state_dict` does.
- Gated attention: q_proj's [q_h; gate_h] per head becomes linear_qkv's [q heads; gates; k; v] per query group
  (`Kind.GATED_QKV`, Megatron's `attention_output_gate`); per-head q/k norms; rotary on the first
  `partial_rotary_factor` of each head (`rotary_percent`).
- Every norm of HF's but one scales by 1 + weight, Megatron's `layernorm_zero_centered_gamma`: their bytes are
  the same. The DeltaNet's gated output norm scales by the weight itself in HF and by 1 + weight in Megatron
  (the config switch applies to every norm): Megatron holds weight - 1 (`Rule.shift`).
- Qwen3.5 (`Qwen3_5ForCausalLM`, dense SwiGLU MLPs; `Qwen3_5MoeForCausalLM`, experts in every layer) is the same
  model but for the DeltaNet's input projections: `in_proj_qkv` ([q; k; v] flat, as the conv1d's channels),
  `in_proj_z`, `in_proj_b`, `in_proj_a` are Megatron's in_proj sections in order, unregrouped (`Kind.PARTS` over
  four tensors). Its interleaved multimodal rotary (`mrope_section`) is plain rotary for text: every section
  takes the same (text) position.
- Megatron-Core's spec is TransformerEngine's only (`--transformer-impl local` is refused), its DeltaNet has no
  conv bias and no in/out projection bias, and it takes `hidden_act` silu; other variants are refused by name.
"""

from ..base.errors import ConversionError
from .mapping import Family, Kind, rule
from .llama import DENSE_MLP, EMBEDDING, FINAL
from .moe import routed_experts, shared_expert

IN_PROJ_PARTS = ("query", "key", "value", "z", "beta", "alpha")
CONV_PARTS = ("query", "key", "value")


def _linear(megatron, hf, kind, **kw):
    return rule(megatron, hf, kind, mixer="linear", **kw)


def _attention(megatron, hf, kind, **kw):
    return rule(megatron, hf, kind, mixer="attention", **kw)


def _value_heads(c):
    return [(c.linear_num_value_heads,)]


GATED_DELTA_NET = (
    _linear("self_attention.in_proj.layer_norm_weight", "input_layernorm.weight", Kind.REPLICATED,
            local="input_layernorm.weight"),
    _linear("self_attention.in_proj.weight", ("linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight"),
            Kind.GDN_IN_PROJ, parts=lambda c: c.linear_qkvz_parts, dist_parts=IN_PROJ_PARTS,
            shape=lambda c: [(sum(c.linear_qkvz_parts[:4]), c.hidden_size), (sum(c.linear_qkvz_parts[4:]),
                                                                            c.hidden_size)]),
    _linear("self_attention.conv1d.weight", "linear_attn.conv1d.weight", Kind.PARTS,
            parts=lambda c: c.linear_conv_parts, dist_parts=CONV_PARTS,
            shape=lambda c: [(sum(c.linear_conv_parts), 1, c.linear_conv_kernel)]),
    _linear("self_attention.A_log", "linear_attn.A_log", Kind.COLUMN, shape=_value_heads),
    _linear("self_attention.dt_bias", "linear_attn.dt_bias", Kind.COLUMN, shape=_value_heads),
    _linear("self_attention.out_norm.weight", "linear_attn.norm.weight", Kind.REPLICATED, shift=-1.0,
            shape=lambda c: [(c.linear_value_head_dim,)]),
    _linear("self_attention.out_proj.weight", "linear_attn.out_proj.weight", Kind.ROW,
            shape=lambda c: [(c.hidden_size, c.linear_num_value_heads * c.linear_value_head_dim)]),
)

# Qwen3.5: the same sections, one HF tensor for q, k, v and one each for z, beta, alpha.
SPLIT_IN_PROJ = tuple(
    _linear("self_attention.in_proj.weight", tuple(f"linear_attn.{n}.weight" for n in (
        "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")), Kind.PARTS, parts=lambda c: c.linear_qkvz_parts,
            dist_parts=IN_PROJ_PARTS, shape=lambda c: [(sum(c.linear_qkvz_parts[:3]), c.hidden_size)] + [
                (n, c.hidden_size) for n in c.linear_qkvz_parts[3:]])
    if r.megatron.endswith("self_attention.in_proj.weight") else r for r in GATED_DELTA_NET)

GATED_ATTENTION = (
    _attention("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", Kind.REPLICATED,
               local="input_layernorm.weight"),
    _attention("self_attention.linear_qkv.weight",
               ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Kind.GATED_QKV),
    _attention("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", Kind.REPLICATED),
    _attention("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", Kind.REPLICATED),
    _attention("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Kind.ROW),
)


class Qwen3Next(Family):
    def check(self, cfg) -> None:
        """What Megatron-Core 0.16.1's gated DeltaNet and gated attention cannot express, refused by name."""
        raw = cfg.raw
        if raw.get("attention_bias"):
            raise ConversionError("config.json: attention_bias = true: Megatron-Core's gated attention here has no "
                                  "q/k/v/o bias (add_bias_linear would put biases on every linear layer)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"config.json: hidden_act {raw.get('hidden_act')!r}: Megatron-Core's gated DeltaNet "
                                  f"and SwiGLU experts take silu (one activation_func for both)")
        if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
            raise ConversionError(f"config.json: linear_num_value_heads {cfg.linear_num_value_heads} is not a "
                                  f"multiple of linear_num_key_heads {cfg.linear_num_key_heads} (Megatron-Core's "
                                  f"gated DeltaNet requires it)")
        self.check_experts(cfg)

    def check_experts(self, cfg) -> None:
        if not cfg.num_experts or not cfg.shared_expert_ffn_hidden_size:
            raise ConversionError("config.json: Qwen3-Next without routed experts and a shared expert "
                                  "(num_experts, shared_expert_intermediate_size) is not supported")

    def check_layout(self, layout, cfg) -> None:
        if layout.transformer_impl == "local":
            raise ConversionError("--transformer-impl local: Megatron-Core 0.16.1 builds gated DeltaNet models "
                                  "with TransformerEngine's spec only (experimental_attention_variant)")
        if layout.tp > 1 and cfg.linear_num_key_heads % layout.tp:
            raise ConversionError(f"--tp {layout.tp} does not divide linear_num_key_heads "
                                  f"{cfg.linear_num_key_heads} (Megatron-Core's gated DeltaNet splits by key heads)")


# The published checkpoints' multi-token-prediction module (`mtp.*`, which transformers does not load): Megatron-Core
# builds MTP layers only from decoder-layer specs, not from a gated-DeltaNet model's, so it is left out on request.
MTP = r"^mtp\."

QWEN3_NEXT = Qwen3Next("qwen3_next", ("Qwen3NextForCausalLM",), (
    EMBEDDING + GATED_DELTA_NET + GATED_ATTENTION + DENSE_MLP
    + routed_experts("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj")
    + shared_expert("mlp.shared_expert", "mlp.shared_expert_gate.weight") + FINAL), unconverted_mtp=MTP)


class Qwen3_5(Qwen3Next):
    def check_experts(self, cfg) -> None:
        """Qwen3_5ForCausalLM has dense MLPs only, Qwen3_5MoeForCausalLM a gated shared expert in every layer."""
        if self.name == "qwen3_5_moe" and not cfg.shared_expert_ffn_hidden_size:
            raise ConversionError("config.json: shared_expert_intermediate_size 0: Qwen3.5-MoE's every layer has a "
                                  "shared expert")


QWEN3_5 = Qwen3_5("qwen3_5", ("Qwen3_5ForCausalLM",), EMBEDDING + SPLIT_IN_PROJ + GATED_ATTENTION + DENSE_MLP + FINAL,
                  unconverted_mtp=MTP)

QWEN3_5_MOE = Qwen3_5("qwen3_5_moe", ("Qwen3_5MoeForCausalLM",), (
    EMBEDDING + SPLIT_IN_PROJ + GATED_ATTENTION
    + routed_experts("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj")
    + shared_expert("mlp.shared_expert", "mlp.shared_expert_gate.weight") + FINAL), unconverted_mtp=MTP)
