"""Ernie-4.5 MoE (`Ernie4_5_MoeForCausalLM`, the text models ERNIE-4.5-21B-A3B and -300B-A47B): Llama attention
rotating interleaved channel pairs (Megatron's `rotary_interleaved`: the same pairs, so q and k need no
permutation), dense layers outside `moe_layer_start_index`..`moe_layer_end_index` (every `moe_layer_interval`-th
inside), then routed experts behind a softmax router, top-k renormalised (Megatron's softmax router with
`moe_router_pre_softmax` off), and ungated shared experts.

HF adds `moe_statics.e_score_correction_bias` to the softmax scores to choose the experts. Megatron-Core's
expert bias exists only beside its sigmoid router (TransformerConfig refuses it with softmax), so the bias is
converted only all zero (transformers' initial value), where HF's choice is Megatron's; any other value is
refused naming the tensor (docs/ernie45-facts.md).
"""

import dataclasses

from ..base.errors import ConversionError
from .mapping import Family, ZeroTensor
from .llama import ATTENTION, DENSE_MLP, EMBEDDING, FINAL
from .moe import routed_experts, shared_expert

SELECTION_BIAS = ZeroTensor(
    "model.layers.{i}.mlp.moe_statics.e_score_correction_bias", "moe", lambda c: (1, c.num_experts), "F32",
    "Ernie-4.5 adds it to softmax scores to choose experts, and Megatron-Core's expert bias works only with its "
    "sigmoid router")


class Ernie45Moe(Family):
    def check(self, cfg) -> None:
        raw = cfg.raw
        if raw.get("use_bias"):
            raise ConversionError("config.json: use_bias = true: Ernie-4.5 then biases q/k/v/o, every MLP and "
                                  "lm_head, and Megatron-Core's output layer has no bias")
        norm_min = raw.get("moe_norm_min", 1e-12)
        # The top-k softmax weights sum to at least k / experts: a smaller floor never bites.
        if not isinstance(norm_min, (int, float)) or norm_min > cfg.moe_topk / cfg.num_experts:
            raise ConversionError(f"config.json: moe_norm_min = {norm_min!r} exceeds moe_k / moe_num_experts = "
                                  f"{cfg.moe_topk / cfg.num_experts:.4g}: HF would then floor the renormalising "
                                  f"sum, which Megatron-Core's router never does")
        from ..config.arch_args import _llama3_write

        _llama3_write(cfg)  # refuses, before planning, rope scaling Megatron's GPT rotary embedding lacks
        if raw.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"config.json: hidden_act = {raw['hidden_act']!r}: Megatron-Core's SwiGLU is SiLU")


ERNIE45_MOE = Ernie45Moe("ernie4_5_moe", ("Ernie4_5_MoeForCausalLM",), (
    EMBEDDING + ATTENTION + DENSE_MLP
    + routed_experts("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj")
    + tuple(dataclasses.replace(r, when="shared_expert_ffn_hidden_size")  # moe_num_shared_experts 0: none
            for r in shared_expert("mlp.shared_experts", gate=None))
    + FINAL), zeros=(SELECTION_BIAS,),
    # The published checkpoints' MTP layer (`mtp_block.*`, `mtp_emb_norm.*`, ...: names transformers skips by "mtp").
    unconverted_mtp=r"mtp")
