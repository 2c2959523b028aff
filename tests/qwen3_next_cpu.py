"""Test side only: Megatron-Core's real Qwen3-Next GPTModel (experimental_attention_variant "gated_delta_net") on CPU.

The block spec is Megatron's own `get_transformer_block_with_experimental_attention_variant_spec`: its layer
pattern, GatedDeltaNet, SelfAttention with the output gate, MoE with the gated shared expert and dense MLPs.
It asserts TransformerEngine, which a CPU machine lacks, so its backend provider hands out CPU stand-ins for the
TE modules with the same parameters and sharding (a column-parallel linear with a fused `layer_norm_weight`, a
norm), both honouring `layernorm_zero_centered_gamma` as TE does (scale by 1 + weight); the softmax attention
spec, which Megatron takes from the TE layer spec, is the same SelfAttention with those stand-ins. Megatron's
GatedDeltaNet refuses to build without flash-linear-attention (fla); with `deterministic_mode` its forward
takes Megatron's own torch paths (nn.Conv1d, `torch_chunk_gated_delta_rule`), and only fla's `l2norm` is
needed: given here as fla computes it (x / sqrt(sum x^2 + 1e-6)).
"""

from __future__ import annotations

import dataclasses
from argparse import Namespace

import torch


def _norm(x, weight, config):
    scale = 1 + weight.float() if config.layernorm_zero_centered_gamma else weight.float()
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon)
    return (out * scale).to(x.dtype)


def _modules():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class CPUNorm(torch.nn.Module):
        """TENorm's parameters (`weight`, replicated) and its RMSNorm, zero-centred when configured."""

        def __init__(self, config, hidden_size, eps=1e-5, **_):
            super().__init__()
            self.config = config
            self.weight = torch.nn.Parameter(torch.zeros(hidden_size) if config.layernorm_zero_centered_gamma
                                             else torch.ones(hidden_size))

        def forward(self, x):
            return _norm(x, self.weight, self.config)

    class NormColumnParallelLinear(ColumnParallelLinear):
        """TELayerNormColumnParallelLinear's parameters: the column-split weight and a whole norm weight."""

        def __init__(self, input_size, output_size, *, config, **kw):
            super().__init__(input_size, output_size, config=config, **kw)
            self.layer_norm_weight = torch.nn.Parameter(torch.zeros(input_size))

        def forward(self, x, *args, **kw):
            return super().forward(_norm(x, self.layer_norm_weight, self.config), *args, **kw)

    return CPUNorm, NormColumnParallelLinear


def _patch() -> None:
    from megatron.core.models import backends
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as specs
    from megatron.core.ssm import gated_delta_net
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.tensor_parallel import RowParallelLinear

    cpu_norm, norm_linear = _modules()

    class CPUBackend(backends.LocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self):
            return norm_linear

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
            return cpu_norm

    def attention_spec(config, backend=None):
        return ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                          submodules=SelfAttentionSubmodules(linear_qkv=norm_linear, core_attention=DotProductAttention,
                                                             linear_proj=RowParallelLinear, q_layernorm=cpu_norm,
                                                             k_layernorm=cpu_norm),
                          metainfo={"fuse_input_layernorm": True})

    specs._get_backend_spec_provider = lambda config: CPUBackend()
    specs._get_self_attention_module_spec = attention_spec
    gated_delta_net.HAVE_FLA = True  # only the constructor checks it; the forward below needs only l2norm
    gated_delta_net.l2norm = lambda x: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def build_qwen3_next_models(args: Namespace) -> list:
    """This rank's GPTModel stage for a Qwen3-Next checkpoint's args (float32, eval mode)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_block_with_experimental_attention_variant_spec)

    from dist_reshard.testing import mcore_cpu

    mcore_cpu.apply_cpu_patches()
    _patch()
    config = dataclasses.replace(
        mcore_cpu._transformer_config(args), transformer_impl="transformer_engine", deterministic_mode=True,
        layernorm_zero_centered_gamma=args.layernorm_zero_centered_gamma,
        attention_output_gate=args.attention_output_gate,
        experimental_attention_variant=args.experimental_attention_variant,
        linear_attention_freq=list(args.linear_attention_freq), linear_conv_kernel_dim=args.linear_conv_kernel_dim,
        linear_key_head_dim=args.linear_key_head_dim, linear_value_head_dim=args.linear_value_head_dim,
        linear_num_key_heads=args.linear_num_key_heads, linear_num_value_heads=args.linear_num_value_heads)
    spec = get_transformer_block_with_experimental_attention_variant_spec(
        config, pp_rank=ps.get_pipeline_model_parallel_rank())
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope", rotary_percent=args.rotary_percent, rotary_base=args.rotary_base)
    return [model.eval()]
