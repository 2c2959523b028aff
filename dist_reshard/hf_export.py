"""The HF `config.json` of an exported model.

In order of preference: the reference folder's own (`--hf-config DIR`); the HF config that an HF -> Megatron
conversion stored in the checkpoint's args (`args.hf_config`), which makes a round trip reproduce it; or
one rebuilt from the Megatron args, with the family's own field names.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace

from .errors import ConversionError
from .hf_config import ModelConfig

_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
                "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _hybrid_from_args(cfg: ModelConfig, dtype: str | None) -> dict:
    """Nemotron-H / Mamba-2 config fields (transformers' names) of a MambaModel checkpoint."""
    common = {"architectures": [cfg.architecture], "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "layer_norm_epsilon": cfg.norm_epsilon, "tie_word_embeddings": cfg.tie_word_embeddings,
              "n_groups": cfg.mamba_num_groups, "conv_kernel": cfg.mamba_conv_kernel,
              "torch_dtype": _TORCH_DTYPES.get(dtype or "", "float32")}
    if cfg.architecture == "Mamba2ForCausalLM":
        return dict(common, model_type="mamba2", num_hidden_layers=cfg.num_layers, num_heads=cfg.mamba_num_heads,
                    head_dim=cfg.mamba_head_dim, state_size=cfg.mamba_state_dim,
                    expand=cfg.mamba_d_inner // cfg.hidden_size)
    names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    return dict(common, model_type="nemotron_h", layers_block_type=[names[k] for k in cfg.layer_kinds],
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
                head_dim=cfg.kv_channels, intermediate_size=cfg.ffn_hidden_size, mlp_hidden_act="relu2",
                max_position_embeddings=cfg.max_position_embeddings, mamba_num_heads=cfg.mamba_num_heads,
                mamba_head_dim=cfg.mamba_head_dim, ssm_state_size=cfg.mamba_state_dim)


def _from_args(args: Namespace, cfg: ModelConfig, family: str, dtype: str | None) -> dict:
    if cfg.hybrid:
        return _hybrid_from_args(cfg, dtype)
    out = {
        "architectures": [cfg.architecture], "model_type": _MODEL_TYPES.get(family, family),
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels, "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "torch_dtype": _TORCH_DTYPES.get(dtype or "", "float32"),
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.num_experts:
        dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
        out["num_experts_per_tok"] = cfg.moe_topk
        if family == "mixtral":
            out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_ffn_hidden_size)
        else:
            out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                       norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=dense)
            if cfg.shared_expert_ffn_hidden_size:
                out["shared_expert_intermediate_size"] = cfg.shared_expert_ffn_hidden_size
    return out


def hf_config(args: Namespace, cfg: ModelConfig, family: str, dtype: str | None, reference: str | None) -> dict:
    if reference:
        path = os.path.join(reference, "config.json")
        try:
            with open(path) as f:
                ref = json.load(f)
        except (OSError, ValueError) as e:
            raise ConversionError(f"--hf-config {reference}: cannot read config.json ({e})") from None
        for key, value in (("num_hidden_layers", cfg.num_layers), ("hidden_size", cfg.hidden_size)):
            if ref.get(key) != value:
                raise ConversionError(f"--hf-config {reference}: {key} = {ref.get(key)!r} but the checkpoint has "
                                      f"{value}")
        return ref
    stored = getattr(args, "hf_config", None)
    if isinstance(stored, dict) and stored.get("architectures"):
        return dict(stored)
    if cfg.stacks:  # a composite model (LLaVA): its config was rebuilt from the args whole
        return dict(cfg.raw)
    return _from_args(args, cfg, family, dtype)
