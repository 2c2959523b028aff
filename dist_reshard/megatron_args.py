"""The `args` namespace stored in Megatron checkpoints.

Megatron-LM asserts some of these equal its own flags (num_layers, hidden_size, num_attention_heads,
add_position_embedding, tensor/pipeline sizes) and copies the rest with `--use-checkpoint-args`, so
every architectural fact goes in. `true_vocab_size` records the unpadded vocabulary for the way back.
"""

from __future__ import annotations

from argparse import Namespace

from .hf_config import ModelConfig
from .layout import TargetLayout

_PARAMS_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def megatron_args(cfg: ModelConfig, layout: TargetLayout, padded_vocab: int, family: str,
                  source_dtype: str | None, qk_layernorm: bool, qkv_bias: bool) -> Namespace:
    import torch

    dtype = layout.dtype or source_dtype or "fp32"
    scaling = cfg.rope_scaling or {}
    llama3_scaling = scaling.get("rope_type", scaling.get("type")) == "llama3"
    per_stage = cfg.num_layers // layout.pp
    return Namespace(
        # Architecture.
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="rope",
        add_position_embedding=False,
        rotary_base=cfg.rope_theta,
        rotary_percent=1.0,
        rotary_interleaved=False,
        use_rope_scaling=llama3_scaling,
        rope_scaling_factor=float(scaling.get("factor", 8.0)) if llama3_scaling else 8.0,
        hf_rope_scaling=dict(scaling) or None,
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_epsilon,
        apply_layernorm_1p=False,
        qk_layernorm=qk_layernorm,
        add_qkv_bias=qkv_bias,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        window_size=(cfg.sliding_window, 0) if cfg.sliding_window else None,
        num_experts=None,
        # Vocabulary.
        padded_vocab_size=padded_vocab,
        vocab_size=cfg.vocab_size,
        true_vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by,
        tokenizer_type="HuggingFaceTokenizer",
        # Layout.
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_per_virtual_pipeline_stage=per_stage // layout.vpp if layout.vpp else None,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        sequence_parallel=False,
        # Precision and format.
        params_dtype=getattr(torch, _PARAMS_DTYPE[dtype].split(".")[1]),
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        ckpt_format=layout.ckpt_format,
        transformer_impl=layout.transformer_impl,
        use_legacy_models=False,
        iteration=1,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        hf_architecture=cfg.architecture,
        hf_model_type=cfg.model_type,
        model_family=family,
    )
