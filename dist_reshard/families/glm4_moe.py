"""GLM-4.5 / 4.6 (`Glm4MoeForCausalLM`): GQA attention with a q/k/v bias and optional per-head q/k norms
(`use_qk_norm`), rotary embeddings on the first `partial_rotary_factor` of each head (Megatron's
`rotary_percent`), dense layers before `first_k_dense_replace`, then routed experts behind DeepSeek-V3's
sigmoid router with its selection bias (`e_score_correction_bias`) and ungated shared experts. The
multi-token-prediction layer stored after the decoder is DeepSeek-V3's (families/mtp.py).

GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`) is the same router on DeepSeek-V3's multi-latent attention, under
DeepSeek-V3's names: DeepSeek-V3's table.
"""

import dataclasses

from .mapping import Family
from .deepseek_v3 import DEEPSEEK_V3, ROUTER_BIAS, DeepseekV3, check_sigmoid_routing
from .llama import ATTENTION, DENSE_MLP, EMBEDDING, FINAL
from .moe import routed_experts, shared_expert
from .mtp import with_mtp
from .qwen3 import QK_NORM


class Glm4Moe(Family):
    def check(self, cfg) -> None:
        check_sigmoid_routing(cfg)


GLM4_MOE = Glm4Moe("glm4_moe", ("Glm4MoeForCausalLM",), with_mtp(
    EMBEDDING + ATTENTION + tuple(dataclasses.replace(r, optional=True) for r in QK_NORM) + DENSE_MLP
    + routed_experts("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj") + ROUTER_BIAS
    + shared_expert("mlp.shared_experts", gate=None) + FINAL))

GLM4_MOE_LITE = DeepseekV3("glm4_moe_lite", ("Glm4MoeLiteForCausalLM",), DEEPSEEK_V3.rules)
