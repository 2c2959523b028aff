"""GPT-OSS (`GptOssForCausalLM`): GQA attention with q/k/v/o biases and a learned sink logit per head, every
layer a MoE whose router and experts carry biases, experts fused in HF (see fused_experts.py).

- Sinks (`self_attn.sinks`, one per head) are Megatron-Core's `softmax_type="learnable"` offsets
  (`core_attention.softmax_offset`), split over TP with the heads.
- `mlp.experts.gate_up_proj` [E, H, 2I] computes `x @ W`, gate and up in alternate columns; Megatron's
  `linear_fc1` of expert e is [2I, H], gate rows then up rows: the slab viewed [H, I, 2] and permuted (2, 1, 0).
  Its bias [E, 2I] alternates alike. `down_proj` [E, I, H] is `linear_fc2`'s [H, I] transposed.
- The clamped GLU `(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)` with `g = clamp(gate, max=limit)` is
  Megatron's quick-GELU GLU with `glu_linear_offset` 1 and `activation_func_clamp_value` limit; Megatron's
  quick GELU fixes alpha at 1.702, so any other `swiglu_alpha` is refused.
- MXFP4 sources (`*_blocks` + `*_scales`, as published) are read as the bf16 they stand for (mxfp4.py): each
  expert's slab decoded by the rank that reads it; outputs are bf16 (the way back writes bf16 fused tensors).
- The way back writes the fused tensors again (fused_experts.py), byte for byte what the HF folder held.
"""

from ..base.errors import ConversionError
from .fused_experts import FusedExperts, split_fused_experts
from .mapping import Family, Kind, rule
from .llama import ATTENTION, EMBEDDING, FINAL


def _i(c):
    return c.moe_ffn_hidden_size


SINKS_AND_OUTPUT_BIAS = (
    rule("self_attention.linear_proj.bias", "self_attn.o_proj.bias", Kind.REPLICATED),
    rule("self_attention.core_attention.softmax_offset", "self_attn.sinks", Kind.COLUMN,
         shape=lambda c: [(c.num_attention_heads,)]),
)

_EXPERT = dict(where="moe", expert=True, ffn="expert")

MOE = (
    rule("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", Kind.REPLICATED, where="moe",
         local_dist_key="mlp.linear_fc1.layer_norm_weight"),
    rule("mlp.router.weight", "mlp.router.weight", Kind.REPLICATED, where="moe"),
    rule("mlp.router.bias", "mlp.router.bias", Kind.REPLICATED, where="moe", shape=lambda c: [(c.num_experts,)]),
    rule("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.{e}.gate_up_proj", Kind.PARTS,
         parts=lambda c: (_i(c), _i(c)), shape=lambda c: [(2 * _i(c), c.hidden_size)],
         grouped="mlp.experts.linear_fc1.weight{e}", dist_key="mlp.experts.experts.linear_fc1.weight", **_EXPERT),
    rule("mlp.experts.local_experts.{e}.linear_fc1.bias", "mlp.experts.{e}.gate_up_proj_bias", Kind.PARTS,
         parts=lambda c: (_i(c), _i(c)), shape=lambda c: [(2 * _i(c),)],
         grouped="mlp.experts.linear_fc1.bias{e}", dist_key="mlp.experts.experts.linear_fc1.bias", **_EXPERT),
    rule("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.{e}.down_proj", Kind.ROW,
         shape=lambda c: [(c.hidden_size, _i(c))],
         grouped="mlp.experts.linear_fc2.weight{e}", dist_key="mlp.experts.experts.linear_fc2.weight", **_EXPERT),
    rule("mlp.experts.local_experts.{e}.linear_fc2.bias", "mlp.experts.{e}.down_proj_bias", Kind.REPLICATED,
         shape=lambda c: [(c.hidden_size,)],
         grouped="mlp.experts.linear_fc2.bias{e}", dist_key="mlp.experts.experts.linear_fc2.bias", **_EXPERT),
)

FUSED = (
    # MXFP4 (as published): [E, 2I, H] in the linear layer's orientation, gate and up in alternate rows.
    FusedExperts("mlp.experts.gate_up_proj", "mlp.experts.{e}.gate_up_proj", lambda c: (c.hidden_size, 2 * _i(c)),
                 view=lambda c: (c.hidden_size, _i(c), 2), perm=(2, 1, 0),
                 mxfp4_view=lambda c: (_i(c), 2, c.hidden_size), mxfp4_perm=(1, 0, 2)),
    FusedExperts("mlp.experts.gate_up_proj_bias", "mlp.experts.{e}.gate_up_proj_bias", lambda c: (2 * _i(c),),
                 view=lambda c: (_i(c), 2), perm=(1, 0)),
    FusedExperts("mlp.experts.down_proj", "mlp.experts.{e}.down_proj", lambda c: (_i(c), c.hidden_size),
                 perm=(1, 0)),  # MXFP4: [E, H, I], linear_fc2's own orientation
    FusedExperts("mlp.experts.down_proj_bias", "mlp.experts.{e}.down_proj_bias", lambda c: (c.hidden_size,)),
)

# Megatron-Core's quick_gelu: x * sigmoid(1.702 x).
QUICK_GELU_ALPHA = 1.702


class GptOss(Family):
    def check(self, cfg) -> None:
        raw = cfg.raw
        alpha = raw.get("swiglu_alpha", QUICK_GELU_ALPHA)
        if alpha != QUICK_GELU_ALPHA:
            raise ConversionError(f"config.json: swiglu_alpha = {alpha!r}: Megatron-Core's quick-GELU GLU computes "
                                  f"x * sigmoid({QUICK_GELU_ALPHA} x) and has no other alpha")
        types = raw.get("layer_types")
        if types is not None and (not isinstance(types, list) or len(types) != cfg.num_layers
                                  or set(types) - {"sliding_attention", "full_attention"}):
            raise ConversionError(f"config.json: layer_types = {types!r} is not one of 'sliding_attention' / "
                                  f"'full_attention' per layer ({cfg.num_layers} layers)")
        if not cfg.attention_bias:
            raise ConversionError("config.json: attention_bias = false: Megatron-Core's add_bias_linear puts biases "
                                  "on every linear layer, and GPT-OSS's experts and router always have them")

    def check_layout(self, layout, cfg) -> None:
        if layout.expert_tp > 1:
            raise ConversionError(f"--etp {layout.expert_tp}: Megatron-Core supports biases in MoE layers only with "
                                  f"an expert tensor-parallel size of 1 (GPT-OSS's experts have biases); use --etp 1")

    def source_index(self, index: dict, cfg) -> dict:
        return split_fused_experts(index, self.fused, cfg)


GPT_OSS = GptOss("gpt_oss", ("GptOssForCausalLM",),
                 EMBEDDING + ATTENTION + SINKS_AND_OUTPUT_BIAS + MOE + FINAL, FUSED)
