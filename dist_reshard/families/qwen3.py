"""Qwen3: the dense decoder plus per-head RMSNorm on queries and keys; head_dim may differ from hidden/heads."""

from .mapping import Family, Kind, rule
from .llama import DENSE_DECODER

QK_NORM = (
    rule("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", Kind.REPLICATED),
    rule("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", Kind.REPLICATED),
)

QWEN3 = Family("qwen3", ("Qwen3ForCausalLM",), DENSE_DECODER + QK_NORM)
