"""Mixtral: the Mistral decoder with every MLP replaced by `block_sparse_moe` (w1 gate, w3 up, w2 down)."""

from .mapping import Family
from .llama import ATTENTION, EMBEDDING, FINAL
from .moe import routed_experts

MIXTRAL = Family("mixtral", ("MixtralForCausalLM",), EMBEDDING + ATTENTION + routed_experts(
    "block_sparse_moe.gate.weight", "block_sparse_moe.experts", "w1", "w3", "w2") + FINAL)
