"""DeepSeek-V3 (also published as Kimi-K2 and Moonlight): multi-latent attention, dense layers before
`first_k_dense_replace`, then routed and shared experts behind a sigmoid router with a selection bias.

The down projections (`q_a_proj`, `kv_a_proj_with_mqa`) are whole on every TP rank in the TE spec
(`parallel_mode="duplicated"`) and column-split in the local spec, which all-gathers their output. TE
fuses the q/kv latent norms into the up projections (`layer_norm_weight`); the local spec keeps them as
modules, and its MLA layers have no key map, so its torch_dist keys are its own module names.
"""

import dataclasses

from .mapping import Family, Kind, rule
from .llama import DENSE_MLP, EMBEDDING, FINAL
from .moe import routed_experts, shared_expert
from .mtp import with_mtp


def _heads(per_head: str, cols: str):
    return lambda c: [(c.num_attention_heads * getattr(c, per_head), getattr(c, cols))]


MLA = (
    rule("input_layernorm.weight", "input_layernorm.weight", Kind.REPLICATED),
    rule("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight", Kind.COLUMN, when="!q_lora",
         shape=_heads("qk_head_dim", "hidden_size")),
    rule("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight", Kind.REPLICATED,
         local_kind=Kind.COLUMN, when="q_lora", shape=lambda c: [(c.q_lora_rank, c.hidden_size)]),
    rule("self_attention.linear_q_up_proj.layer_norm_weight", "self_attn.q_a_layernorm.weight", Kind.REPLICATED,
         local="self_attention.q_layernorm.weight", when="q_lora", shape=lambda c: [(c.q_lora_rank,)]),
    rule("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight", Kind.COLUMN, when="q_lora",
         shape=_heads("qk_head_dim", "q_lora_rank")),
    rule("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", Kind.REPLICATED,
         local_kind=Kind.COLUMN, shape=lambda c: [(c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)]),
    rule("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attn.kv_a_layernorm.weight", Kind.REPLICATED,
         local="self_attention.kv_layernorm.weight", shape=lambda c: [(c.kv_lora_rank,)]),
    rule("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight", Kind.COLUMN,
         shape=lambda c: [(c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)]),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Kind.ROW,
         shape=lambda c: [(c.hidden_size, c.num_attention_heads * c.v_head_dim)]),
)

# Added to the scores only to choose experts, never to weight them. Megatron holds it in float32 whatever
# the model dtype (and casts what it loads), so --dtype leaves it as stored rather than round it.
ROUTER_BIAS = (
    rule("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", Kind.REPLICATED, where="moe",
         keep_dtype=True, when="router_expert_bias",
         shape=lambda c: [(c.num_experts,)]),
)


def _local_keys_unmapped(r):
    """torch_dist keys of the local spec are its module names (MLA layers have no TE-name key map)."""
    if r.local:
        return dataclasses.replace(r, local_dist_key=r.local.replace("{i}.", ""))
    return dataclasses.replace(r, local_dist_key=None) if r.local_dist_key else r


def check_sigmoid_routing(cfg) -> None:
    """DeepSeek-style routing Megatron-Core cannot express (shared by the families that route this way)."""
    from ..base.errors import ConversionError

    if cfg.router_score != "sigmoid" or (cfg.moe_topk > 1 and not cfg.norm_topk_prob):
        # Megatron's sigmoid router always renormalises the top-k weights.
        raise ConversionError(f"config.json: scoring_func {cfg.router_score!r} with norm_topk_prob "
                              f"{cfg.norm_topk_prob}: Megatron-Core's router expresses only sigmoid scores "
                              f"with renormalised top-k weights")
    if cfg.router_groups > 1 and cfg.moe_topk // cfg.router_group_topk != 2:
        # HF ranks expert groups by their best two scores; Megatron by their best topk // topk_group.
        raise ConversionError(f"config.json: num_experts_per_tok {cfg.moe_topk} / topk_group "
                              f"{cfg.router_group_topk} is not 2: Megatron-Core ranks expert groups by their "
                              f"top {cfg.moe_topk // cfg.router_group_topk} scores where HF uses the top 2")


def check_mla(cfg) -> None:
    """Multi-latent attention Megatron-Core cannot express (shared by the families built on it)."""
    from ..base.errors import ConversionError

    if not cfg.mla:
        raise ConversionError(f"config.json: {cfg.architecture} without kv_lora_rank is not multi-latent "
                              f"attention; not supported")
    if cfg.raw.get("rope_interleave", True) is False:
        # Megatron's MLA always de-interleaves the rotary half of q and k, as HF does by default.
        raise ConversionError("config.json: rope_interleave = false: Megatron-Core's multi-latent attention "
                              "always applies rotary embeddings to de-interleaved channels")


class DeepseekV3(Family):
    def check(self, cfg) -> None:
        check_mla(cfg)
        check_sigmoid_routing(cfg)


DEEPSEEK_V3 = DeepseekV3("deepseek_v3", ("DeepseekV3ForCausalLM",), with_mtp(tuple(_local_keys_unmapped(r) for r in (
    EMBEDDING + MLA + DENSE_MLP
    + routed_experts("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj") + ROUTER_BIAS
    + shared_expert("mlp.shared_experts", gate=None) + FINAL))))
