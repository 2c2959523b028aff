"""DeepSeek-V2 and V2-Lite (`DeepseekV2ForCausalLM`): DeepSeek-V3's multi-latent attention (V2-Lite without q
LoRA) and expert layout under V3's names, behind a softmax router: top-k of the softmax over all experts, not
renormalised, times `routed_scaling_factor` (Megatron's `moe_router_pre_softmax` with its scaling factor).

HF rotates q and k as complex pairs of adjacent channels; V3's default (`rope_interleave`) permutes those pairs
into halves first. Both give the same attention scores, and Megatron's MLA computes V3's, so V2 needs no
transform of its own: DeepSeek-V3's table.
"""

from .mapping import Family
from .deepseek_v3 import DEEPSEEK_V3, check_mla

TOPK_METHODS = ("greedy", "group_limited_greedy")


class DeepseekV2(Family):
    def check(self, cfg) -> None:
        from ..base.errors import ConversionError

        check_mla(cfg)
        method = cfg.raw.get("topk_method", "greedy")
        if method not in TOPK_METHODS:
            raise ConversionError(f"config.json: topk_method {method!r}: DeepSeek-V2 routes by "
                                  f"{' or '.join(TOPK_METHODS)} only")
        if cfg.router_score != "softmax" or (cfg.moe_topk > 1 and cfg.norm_topk_prob):
            # transformers' DeepseekV2 router ignores both fields: a config that sets them means another model.
            raise ConversionError(f"config.json: scoring_func {cfg.router_score!r} with norm_topk_prob "
                                  f"{cfg.norm_topk_prob}: DeepSeek-V2 scores by softmax without renormalising")
        if cfg.raw.get("mlp_bias"):
            raise ConversionError("config.json: mlp_bias = true: Megatron-Core's MLA models have no MLP biases")
        if cfg.router_groups > 1 and cfg.moe_topk // cfg.router_group_topk != 1:
            # HF ranks expert groups by their best score; Megatron by the sum of their best topk // topk_group.
            raise ConversionError(f"config.json: group_limited_greedy with num_experts_per_tok {cfg.moe_topk} and "
                                  f"topk_group {cfg.router_group_topk}: Megatron-Core ranks expert groups by the sum "
                                  f"of their top {cfg.moe_topk // cfg.router_group_topk} scores where HF uses the "
                                  f"best one (expressible only with num_experts_per_tok < 2 * topk_group)")


DEEPSEEK_V2 = DeepseekV2("deepseek_v2", ("DeepseekV2ForCausalLM",), DEEPSEEK_V3.rules)
