"""Model families: one short declarative table per family, looked up by HF architecture name."""

from __future__ import annotations

from ..base.errors import ConversionError
from .mapping import Family
from . import deepseek_v2, deepseek_v3, ernie45, glm4_moe, gpt_oss, hybrid, llama, llava, mixtral, nemotron, phi3, \
    qwen2, qwen3, qwen3_next, qwen_moe

FAMILIES: tuple[Family, ...] = (llama.LLAMA, llama.MISTRAL, qwen2.QWEN2, qwen3.QWEN3, phi3.PHI3, nemotron.NEMOTRON,
                              mixtral.MIXTRAL,
                              qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, deepseek_v3.DEEPSEEK_V3, deepseek_v2.DEEPSEEK_V2,
                              gpt_oss.GPT_OSS, glm4_moe.GLM4_MOE, glm4_moe.GLM4_MOE_LITE, ernie45.ERNIE45_MOE, qwen3_next.QWEN3_NEXT,
                              qwen3_next.QWEN3_5, qwen3_next.QWEN3_5_MOE,
                              llava.LLAVA, hybrid.NEMOTRON_H, hybrid.MAMBA2)


def family_for(architecture: str, config_path: str = "config.json") -> Family:
    for fam in FAMILIES:
        if architecture in fam.architectures:
            return fam
    supported = ", ".join(a for fam in FAMILIES for a in fam.architectures)
    raise ConversionError(f"{config_path}: unsupported architecture {architecture!r}; supported: {supported}")
