"""The HF `config.json` of an exported model.

In order of preference: the reference folder's own (`--hf-config DIR`); the HF config that an HF -> Megatron
conversion stored in the checkpoint's args (`args.hf_config`), which makes a round trip reproduce it; or
one rebuilt from the Megatron args, with the family's own field names.
"""

from __future__ import annotations

import json
import os
from ..base.errors import ConversionError
from .hf_config import MODEL_TYPES as _MODEL_TYPES, ModelConfig

_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _hybrid_from_args(cfg: ModelConfig, dtype: str | None) -> dict:
    """Nemotron-H / Mamba-2 config fields (transformers' names) of a MambaModel checkpoint."""
    common = {"architectures": [cfg.architecture], "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "layer_norm_epsilon": cfg.norm_epsilon, "tie_word_embeddings": cfg.tie_word_embeddings,
              "n_groups": cfg.mamba_num_groups, "conv_kernel": cfg.mamba_conv_kernel,
              "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": _TORCH_DTYPES.get(dtype or "", "float32")}
    if cfg.architecture == "Mamba2ForCausalLM":
        return dict(common, model_type="mamba2", num_hidden_layers=cfg.num_layers, num_heads=cfg.mamba_num_heads,
                    head_dim=cfg.mamba_head_dim, state_size=cfg.mamba_state_dim,
                    expand=cfg.mamba_d_inner // cfg.hidden_size)
    names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    return dict(common, model_type="nemotron_h", layers_block_type=[names[k] for k in cfg.layer_kinds],
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
                head_dim=cfg.kv_channels, intermediate_size=cfg.ffn_hidden_size, mlp_hidden_act="relu2",
                mamba_num_heads=cfg.mamba_num_heads,
                mamba_head_dim=cfg.mamba_head_dim, ssm_state_size=cfg.mamba_state_dim)


def hf_fields(cfg: ModelConfig, dtype: str | None = None) -> dict:
    """The HF config stating exactly `cfg`'s facts, under the family's own field names (what
    `hf_config.config_from_dict` reads back: tests/test_arch_args.py holds the two to each other)."""
    if cfg.hybrid:
        return _hybrid_from_args(cfg, dtype)
    model_type = cfg.model_type or _MODEL_TYPES.get(cfg.architecture, "llama")
    out = {
        "architectures": [cfg.architecture], "model_type": model_type,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels, "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "torch_dtype": _TORCH_DTYPES.get(dtype or "", "float32"),
    }
    if model_type == "qwen2_moe":
        out["qkv_bias"] = cfg.attention_bias
    elif model_type != "qwen2":  # Qwen2 always has q/k/v biases
        out["attention_bias"] = cfg.attention_bias
    if cfg.sliding_window:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    elif model_type in ("mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        out["sliding_window"] = None
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.rotary_percent != 1.0:
        out["partial_rotary_factor"] = cfg.rotary_percent
    if model_type == "nemotron":  # NemotronConfig's names; its partial rotary defaults to 0.5, so it is always stated
        del out["rms_norm_eps"]
        out.update(norm_eps=cfg.norm_epsilon, hidden_act="relu2",
                   partial_rotary_factor=cfg.rotary_percent, mlp_bias=False)
    if cfg.mtp_layers:
        out["num_nextn_predict_layers"] = cfg.mtp_layers
    if cfg.mla:
        out.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                   qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   v_head_dim=cfg.v_head_dim, rope_interleave=True)
    if cfg.gated_delta_net:
        out.update(layer_types=["linear_attention" if x else "full_attention" for x in cfg.linear_layers],
                   linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
                   linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
                   linear_conv_kernel_dim=cfg.linear_conv_kernel)
    if not cfg.num_experts:
        return out
    if model_type == "qwen3_5_moe_text":  # every layer routes, always renormalised: its config has no such fields
        if not all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) or not cfg.norm_topk_prob:
            raise ConversionError("Qwen3.5-MoE routes in every layer and renormalises its top-k weights; these "
                                  "args have dense layers or moe_router_pre_softmax")
        del out["intermediate_size"]
        out.update(num_experts_per_tok=cfg.moe_topk, num_experts=cfg.num_experts,
                   moe_intermediate_size=cfg.moe_ffn_hidden_size,
                   shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size)
        return out
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    out["num_experts_per_tok"] = cfg.moe_topk
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_ffn_hidden_size)
    elif model_type == "ernie4_5_moe":
        _ernie_fields(cfg, out)
    elif cfg.mla or cfg.router_score == "sigmoid":  # DeepSeek-V3's and GLM-4.5's fields
        first_dense = next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)), cfg.num_layers)
        if any(not cfg.is_moe_layer(i) for i in range(first_dense, cfg.num_layers)):
            raise ConversionError(f"moe layers {[int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]}: "
                                  f"DeepSeek-V3's config states only leading dense layers (first_k_dense_replace)")
        shared = cfg.shared_expert_ffn_hidden_size // cfg.moe_ffn_hidden_size
        if shared * cfg.moe_ffn_hidden_size != cfg.shared_expert_ffn_hidden_size:
            raise ConversionError(f"moe_shared_expert_intermediate_size {cfg.shared_expert_ffn_hidden_size} is not a "
                                  f"whole number of experts of {cfg.moe_ffn_hidden_size}: DeepSeek-V3 counts "
                                  f"n_shared_experts")
        out.update(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                   first_k_dense_replace=first_dense, moe_layer_freq=1, n_shared_experts=shared,
                   norm_topk_prob=cfg.norm_topk_prob, scoring_func=cfg.router_score,
                   topk_method="noaux_tc" if cfg.router_expert_bias else "greedy", n_group=cfg.router_groups,
                   topk_group=cfg.router_group_topk, routed_scaling_factor=cfg.routed_scaling_factor)
        if model_type == "deepseek_v2":  # no group limit is `greedy` (groups 0 in the args)
            out.update(topk_method="group_limited_greedy" if cfg.router_groups > 1 else "greedy",
                       n_group=max(cfg.router_groups, 1), topk_group=max(cfg.router_group_topk, 1))
    else:
        out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                   norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=dense)
        if cfg.shared_expert_ffn_hidden_size:
            out["shared_expert_intermediate_size"] = cfg.shared_expert_ffn_hidden_size
    return out


def _ernie_fields(cfg: ModelConfig, out: dict) -> None:
    """Ernie-4.5's own names: experts `moe_*`, biases `use_bias`, its MoE layers as start, end and interval."""
    moe = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    start, end = (moe[0], moe[-1]) if moe else (cfg.num_layers, cfg.num_layers - 1)
    interval = next((k for k in range(1, cfg.num_layers + 1) if all(
        cfg.is_moe_layer(i) == (start <= i <= end and (i + 1) % k == 0) for i in range(cfg.num_layers))), None)
    if interval is None:
        raise ConversionError(f"moe layers {[int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]}: Ernie-4.5's "
                              f"config states MoE layers only as a start, an end and an interval")
    if cfg.shared_expert_ffn_hidden_size % cfg.moe_ffn_hidden_size:
        raise ConversionError(f"moe_shared_expert_intermediate_size {cfg.shared_expert_ffn_hidden_size} is not a whole "
                              f"number of experts of {cfg.moe_ffn_hidden_size}: Ernie-4.5 counts moe_num_shared_experts")
    del out["num_experts_per_tok"], out["attention_bias"]
    out.update(moe_num_experts=cfg.num_experts, moe_k=cfg.moe_topk, moe_intermediate_size=cfg.moe_ffn_hidden_size,
               moe_num_shared_experts=cfg.shared_expert_ffn_hidden_size // cfg.moe_ffn_hidden_size,
               moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval, use_bias=False)


def hf_config(cfg: ModelConfig, dtype: str | None, reference: str | None) -> dict:
    if reference:
        path = os.path.join(reference, "config.json")
        try:
            with open(path) as f:
                ref = json.load(f)
        except (OSError, ValueError) as e:
            raise ConversionError(f"--hf-config {reference}: cannot read config.json ({e})") from None
        return ref  # checked against the checkpoint's args before anything was read (megatron_source)
    if cfg.raw:  # the config stored in the args (kept only while it states what the args state), or LLaVA's
        return dict(cfg.raw)  # rebuilt whole from the args
    return hf_fields(cfg, dtype)
