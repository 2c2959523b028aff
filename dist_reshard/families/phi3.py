"""Phi-3 (`Phi3ForCausalLM`): the dense Llama decoder with q, k, v fused in one HF tensor and gate, up in another.

- `self_attn.qkv_proj.weight` holds the rows [q; k; v]: `Kind.QKV` reads them as row sections of that one
  tensor, interleaved per query group into `linear_qkv` as for Llama, each rank reading only its groups' rows.
- `mlp.gate_up_proj.weight` holds the rows [gate; up]: `Kind.PARTS`, each half split over TP, which is
  `linear_fc1`'s [gate shard; up shard] layout. The way back writes both fused tensors as the file held them.
- LongRoPE (`rope_scaling` of type longrope, or its older names su / yarn in Phi-3 configs: short and long
  factor lists per channel, switched by sequence length) has no Megatron-Core counterpart; nor has Phi-3's
  partial rotary here (Megatron reads `rotary_percent` back only as GLM-4.5 or Nemotron-4). Both are refused by name.
"""

from ..base.errors import ConversionError
from .mapping import Family, Kind, rule
from .llama import EMBEDDING, FINAL

ATTENTION = (
    rule("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", Kind.REPLICATED,
         local="input_layernorm.weight"),
    rule("self_attention.linear_qkv.weight", "self_attn.qkv_proj.weight", Kind.QKV),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Kind.ROW),
)

MLP = (
    rule("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", Kind.REPLICATED,
         local="pre_mlp_layernorm.weight"),
    rule("mlp.linear_fc1.weight", "mlp.gate_up_proj.weight", Kind.PARTS,
         parts=lambda c: (c.ffn_hidden_size, c.ffn_hidden_size),
         shape=lambda c: [(2 * c.ffn_hidden_size, c.hidden_size)]),
    rule("mlp.linear_fc2.weight", "mlp.down_proj.weight", Kind.ROW),
)

# The rope types Phi-3 configs name LongRoPE by (transformers maps su and yarn to longrope for Phi-3).
LONGROPE = ("longrope", "su", "yarn")


class Phi3(Family):
    def check(self, cfg) -> None:
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in LONGROPE:
            raise ConversionError(f"config.json: rope_scaling type {kind!r} (Phi-3 LongRoPE: per-channel short/long "
                                  f"factors): Megatron-Core's rotary embedding has no LongRoPE; not supported")
        if cfg.rotary_percent != 1.0:
            raise ConversionError(f"config.json: partial_rotary_factor = {cfg.rotary_percent!r}: not supported for "
                                  f"Phi-3 (Megatron-Core's rotary_percent is read back only as GLM-4.5 or "
                                  f"Nemotron-4)")


PHI3 = Phi3("phi3", ("Phi3ForCausalLM",), EMBEDDING + ATTENTION + MLP + FINAL)
