"""Qwen2-MoE (qkv bias, a sigmoid-gated shared expert) and Qwen3-MoE (q/k norms, no shared expert).

Both may mix dense and MoE layers (`decoder_sparse_step`, `mlp_only_layers`): the dense rows apply to
the dense layers only.
"""

from .mapping import Family
from .llama import ATTENTION, DENSE_MLP, EMBEDDING, FINAL
from .moe import routed_experts, shared_expert
from .qwen3 import QK_NORM

_EXPERTS = routed_experts("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj")

QWEN2_MOE = Family("qwen2_moe", ("Qwen2MoeForCausalLM",), EMBEDDING + ATTENTION + DENSE_MLP + _EXPERTS
                   + shared_expert("mlp.shared_expert", "mlp.shared_expert_gate.weight") + FINAL)
QWEN3_MOE = Family("qwen3_moe", ("Qwen3MoeForCausalLM",), EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + _EXPERTS
                   + FINAL)
