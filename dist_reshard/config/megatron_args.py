"""The `args` namespace stored in Megatron checkpoints.

Megatron-LM asserts some of these equal its own flags (num_layers, hidden_size, num_attention_heads,
add_position_embedding, tensor/pipeline sizes) and copies the rest with `--use-checkpoint-args`, so
every architectural fact goes in. `true_vocab_size` records the unpadded vocabulary for the way back.
"""

from __future__ import annotations

from argparse import Namespace

from . import arch_args
from .hf_config import ModelConfig
from .layout import TargetLayout
from .llava_config import llava_args

_PARAMS_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def megatron_args(cfg: ModelConfig, layout: TargetLayout, padded_vocab: int, family: str,
                  source_dtype: str | None, qk_layernorm: bool) -> Namespace:
    import torch

    dtype = layout.dtype or source_dtype or "fp32"
    per_stage = cfg.num_layers // layout.pp
    args = Namespace(
        # Architecture: every fact under every name Megatron-LM releases read it by (arch_args).
        **arch_args.write(cfg),
        seq_length=min(cfg.max_position_embeddings, 4096),
        add_position_embedding=False,
        qk_layernorm=qk_layernorm or cfg.mla,  # MLA: the q/kv latent norms
        **_moe_extra_args(cfg, layout),
        # Megatron-LM's default weight of the MTP loss (--mtp-loss-scaling-factor): a training choice, no weights.
        **({"mtp_loss_scaling_factor": 0.1} if cfg.mtp_layers else {}),
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
        **_pipeline_args(layout, per_stage),
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
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
        # The way back writes it as config.json; the weights are no longer FP8-quantized once converted.
        hf_config={k: v for k, v in cfg.raw.items() if k != "quantization_config"} or None,
        hf_model_type=cfg.model_type,
        model_family=family,
    )
    vars(args).update(llava_args(cfg))  # the vision encoder and projector of a LLaVA model
    vars(args).update(_hybrid_args(cfg))
    vars(args).update(_gpt_oss_args(cfg))  # GPT-OSS (HF -> Megatron only): its own attention and MLP flags
    return args


def _gpt_oss_args(cfg: ModelConfig) -> dict:
    """GPT-OSS under Megatron-LM's flags (`--softmax-type learnable --quick-geglu --glu-linear-offset 1
    --activation-func-clamp-value L --window-size W-1,0 --window-attn-skip-freq`), YaRN as the TransformerConfig
    fields GPTModel reads for `position_embedding_type="yarn"`. HF's window of W tokens is the query and the
    W - 1 before it, Megatron's (left, right) counts the tokens beside the query. Sliding layers are listed
    (1 = windowed), so any `layer_types` pattern is kept."""
    if cfg.model_type != "gpt_oss":
        return {}
    scaling = cfg.rope_scaling or {}
    types = cfg.raw.get("layer_types") or ["full_attention"] * cfg.num_layers
    sliding = [int(t == "sliding_attention") for t in types]
    window = cfg.sliding_window if any(sliding) else None
    yarn = scaling.get("rope_type", scaling.get("type")) == "yarn"
    return dict(
        softmax_type="learnable",
        add_bias_linear=True,
        swiglu=False,
        quick_geglu=True,
        glu_linear_offset=1.0,
        activation_func_clamp_value=float(cfg.raw.get("swiglu_limit", 7.0)),
        window_size=(window - 1, 0) if window else None,
        window_attn_skip_freq=sliding if window else None,
        **(dict(position_embedding_type="yarn",
                yarn_rotary_scaling_factor=float(scaling.get("factor", 1.0)),
                yarn_original_max_position_embeddings=int(scaling.get("original_max_position_embeddings",
                                                                      cfg.max_position_embeddings)),
                yarn_beta_fast=float(scaling.get("beta_fast", 32.0)),
                yarn_beta_slow=float(scaling.get("beta_slow", 1.0)),
                yarn_mscale=float(scaling.get("mscale", 1.0)),
                yarn_mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)),
                yarn_correction_range_round_to_int=bool(scaling.get("truncate", True)))
           if yarn else {}),
    )


# The output's own pipeline split: never carried over from a Megatron source laid out another way.
PIPELINE_ARGS = ("virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                 "num_virtual_stages_per_pipeline_rank", "decoder_first_pipeline_num_layers",
                 "decoder_last_pipeline_num_layers", "account_for_embedding_in_pipeline_split",
                 "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout")


def _pipeline_args(layout: TargetLayout, per_stage: int) -> dict:
    """Megatron-LM's pipeline split flags. An uneven split gives the virtual pipeline size as
    --num-virtual-stages-per-pipeline-rank (Megatron-LM refuses --num-layers-per-virtual-pipeline-stage with
    first/last stage counts); a layout string implies it, so neither is set beside one."""
    even = not layout.uneven
    return dict(
        num_layers_per_virtual_pipeline_stage=per_stage // layout.vpp if layout.vpp and even else None,
        num_virtual_stages_per_pipeline_rank=layout.vpp if layout.vpp and not even and not layout.stage_layout
        else None,
        decoder_first_pipeline_num_layers=layout.first_stage_layers,
        decoder_last_pipeline_num_layers=layout.last_stage_layers,
        account_for_embedding_in_pipeline_split=layout.embedding_in_split,
        account_for_loss_in_pipeline_split=layout.loss_in_split,
        pipeline_model_parallel_layout=layout.stage_layout,
    )


def _hybrid_args(cfg: ModelConfig) -> dict:
    """Megatron-LM's MambaModel flags (`--is-hybrid-model`, `--hybrid-override-pattern`, `--mamba-*`, `--spec`).
    Nemotron-H's attention has no rotary embedding and its MLP is up -> squared ReLU -> down; Mamba-2 has
    no attention at all (the head count is a placeholder Megatron's argument checks need)."""
    if not cfg.hybrid:
        return {}
    stack = dict(is_hybrid_model=True, hybrid_override_pattern="".join(cfg.layer_kinds), hybrid_attention_ratio=0.0,
                 hybrid_mlp_ratio=0.0, spec=["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"],
                 model_type_name="mamba", transformer_impl="transformer_engine")
    if cfg.hf_layers:  # a GPT model laid out as attention and MLP layers: its rotary embedding and SwiGLU stay
        return stack
    return dict(stack, use_rope_scaling=False)


def _moe_extra_args(cfg: ModelConfig, layout: TargetLayout) -> dict:
    """MoE flags beyond the model facts (arch_args has those): how the experts are stored and trained.

    HF takes a softmax over all experts, then the top-k; Mixtral (and Qwen with `norm_topk_prob`) renormalise
    the k weights, which equals Megatron's top-k of logits followed by a softmax over the k
    (`moe_router_pre_softmax=False`). Without renormalisation it is softmax-then-top-k (`True`).
    `moe_layer_freq` is an explicit per-layer list when dense and MoE layers mix: Megatron's integer form
    counts phase from layer 0, the opposite of HF's `decoder_sparse_step`. A Qwen2-MoE shared expert is
    gated (Ernie-4.5's, the one other softmax family with a shared expert and no MLA, is not); DeepSeek-V2's
    and V3's and Ernie-4.5's routing runs in float32 as in HF.
    """
    if not cfg.num_experts:
        return {}
    ernie = cfg.architecture == "Ernie4_5_MoeForCausalLM"
    return dict(
        moe_shared_expert_gate=bool(cfg.shared_expert_ffn_hidden_size) and cfg.router_score != "sigmoid"
        and not cfg.mla and not ernie,
        moe_grouped_gemm=layout.moe_grouped_gemm,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(cfg.raw.get("router_aux_loss_coef", 0.0) or 0.0),
        moe_token_dispatcher_type="alltoall",
    ) | ({"moe_router_dtype": "fp32"} if cfg.router_score == "sigmoid" or cfg.mla or ernie else {})
