"""Nemotron-4 / Minitron (`NemotronForCausalLM`): the dense decoder with LayerNorms that carry a bias and scale
by 1 + weight, an ungated squared-ReLU MLP and rotary embeddings on part of each head.

- `NemotronLayerNorm1P` is `layer_norm(x, weight + 1, bias)`; Megatron-Core's `layernorm_zero_centered_gamma`
  adds the same 1 when it applies the norm (TE's norms, FusedLayerNorm), so the stored weight is HF's as is: the
  norms are replicated weight and bias pairs, fused into `linear_qkv` / `linear_fc1` as `layer_norm_weight` /
  `layer_norm_bias` in the TE spec, `input_layernorm` / `pre_mlp_layernorm` in the local spec.
- `mlp.up_proj` alone is `linear_fc1` (`gated_linear_unit=False`): split on dim 0 like any column-parallel
  weight; `down_proj` is `linear_fc2`.
- Refused by name: a `hidden_act` other than relu2, biases on the linear layers (`attention_bias` puts one on
  q, k, v and o_proj, which Megatron gives only with `add_bias_linear`, and that adds fc1 / fc2 biases too;
  `mlp_bias`), rope scaling, a sliding window (neither exists in NemotronConfig's model).
"""

from ..base.errors import ConversionError
from .mapping import Family, Kind, rule
from .llama import EMBEDDING

ATTENTION = (
    rule("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", Kind.REPLICATED,
         local="input_layernorm.weight"),
    rule("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias", Kind.REPLICATED,
         local="input_layernorm.bias"),
    rule("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Kind.QKV),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Kind.ROW),
)

MLP = (
    rule("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", Kind.REPLICATED,
         local="pre_mlp_layernorm.weight"),
    rule("mlp.linear_fc1.layer_norm_bias", "post_attention_layernorm.bias", Kind.REPLICATED,
         local="pre_mlp_layernorm.bias"),
    rule("mlp.linear_fc1.weight", "mlp.up_proj.weight", Kind.COLUMN, shape=lambda c: [(c.ffn_hidden_size, c.hidden_size)]),
    rule("mlp.linear_fc2.weight", "mlp.down_proj.weight", Kind.ROW),
)

FINAL = (
    rule("decoder.final_layernorm.weight", "model.norm.weight", Kind.REPLICATED, layer=False),
    rule("decoder.final_layernorm.bias", "model.norm.bias", Kind.REPLICATED, layer=False),
    rule("output_layer.weight", "lm_head.weight", Kind.VOCAB, layer=False,
         tied_to="embedding.word_embeddings.weight"),
)


class Nemotron(Family):
    def check(self, cfg) -> None:
        where = "config.json" if cfg.raw else "args"
        if not cfg.squared_relu:
            raise ConversionError(f"{where}: hidden_act = {cfg.raw.get('hidden_act')!r}: only relu2 (Megatron's "
                                  f"squared_relu) is supported for Nemotron-4")
        for field in ("attention_bias", "mlp_bias"):
            if cfg.raw.get(field) or (field == "attention_bias" and cfg.attention_bias):
                raise ConversionError(f"{where}: {field} = true: not supported for Nemotron-4 (HF's attention_bias "
                                      f"biases q, k, v and o_proj, mlp_bias up and down; Megatron-Core's "
                                      f"add_qkv_bias covers q, k, v only and add_bias_linear every linear layer)")
        if cfg.rope_scaling:
            raise ConversionError(f"{where}: rope_scaling {cfg.rope_scaling!r}: not supported for Nemotron-4 "
                                  f"(Megatron-Core's partial rotary embedding is applied unscaled here)")
        if cfg.sliding_window:
            raise ConversionError(f"{where}: sliding_window = {cfg.sliding_window}: Nemotron-4 attends to every "
                                  f"earlier token")
        if not (cfg.normalization == "LayerNorm" and cfg.layernorm_zero_centered_gamma):
            raise ConversionError(f"{where}: normalization {cfg.normalization!r} (zero-centred gamma "
                                  f"{cfg.layernorm_zero_centered_gamma}): Nemotron-4's norms are LayerNorm with "
                                  f"1 + weight")


NEMOTRON = Nemotron("nemotron", ("NemotronForCausalLM",), EMBEDDING + ATTENTION + MLP + FINAL)
