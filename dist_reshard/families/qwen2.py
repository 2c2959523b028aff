"""Qwen2 / Qwen2.5: the dense decoder with a bias on q, k and v (the optional qkv-bias row applies)."""

from .mapping import Family
from .llama import DENSE_DECODER

QWEN2 = Family("qwen2", ("Qwen2ForCausalLM",), DENSE_DECODER)
