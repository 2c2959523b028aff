"""Test side only: build Megatron-Core's real MambaModel from a converted checkpoint's args.

On a GPU with TransformerEngine and mamba_ssm it is Megatron's own `mamba_stack_spec`. On CPU neither exists,
so the model cannot run forward (the Mamba kernels are CUDA-only), but it can be built and loaded, which
checks every key and shape: the spec keeps Megatron's MambaStack, MambaLayer, MambaMixer, TransformerLayer,
MLPLayer, SelfAttention and MLP, and replaces only the TE modules by CPU stand-ins with the same parameters
and sharding (a column-parallel linear with a fused `layer_norm_weight`, a row-parallel linear, a plain
final norm) and mamba_ssm's gated RMSNorm by a module with its `weight`, split by TP like Megatron's.
"""

from __future__ import annotations

from argparse import Namespace

import torch


def mamba_config(args: Namespace, cpu: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    if getattr(args, "squared_relu", False):
        act = lambda x: torch.pow(torch.nn.functional.relu(x), 2)  # noqa: E731
    else:
        act = torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, gated_linear_unit=bool(args.swiglu), activation_func=act,
        normalization="RMSNorm", layernorm_epsilon=args.norm_epsilon, add_bias_linear=False,
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, use_cpu_initialization=cpu,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        apply_rope_fusion=False,
        **{k: getattr(args, k) for k in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads")
           if getattr(args, k, None)},
    )


def _cpu_spec():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    class NormColumnParallelLinear(ColumnParallelLinear):
        """TELayerNormColumnParallelLinear's parameters: the column-split weight and a whole norm weight."""

        def __init__(self, input_size, output_size, *, config, **kw):
            super().__init__(input_size, output_size, config=config, **kw)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))

        def forward(self, x, *args, **kw):  # RMSNorm, then the linear (only attention/MLP layers run on CPU)
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.config.layernorm_epsilon)
            return super().forward(x, *args, **kw)

    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=NormColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=NormColumnParallelLinear, core_attention=DotProductAttention,
                                          linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=NormColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add)),
    ))


def _stub_triton_ops() -> None:
    """mamba_mixer imports three Triton inference kernels at module level (used only by dynamic inference);
    Triton is not installed on a CPU machine, so that module is replaced by one naming them."""
    import sys
    import types

    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    if name in sys.modules:
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        def unavailable(*a, **k):
            raise RuntimeError("Triton kernel called in a CPU test")

        stub = types.ModuleType(name)
        stub.tensor_get_slice_after = stub.tensor_masked_update = stub.tensor_merge = unavailable
        sys.modules[name] = stub


def _patch_cpu() -> None:
    _stub_triton_ops()
    from megatron.core import parallel_state
    from megatron.core.ssm import mamba_block, mamba_context_parallel, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class GatedNorm(torch.nn.Module):
        """mamba_ssm's gated RMSNorm parameters (`weight`, d_inner / TP), sharded on dim 0 as Megatron's."""

        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False, device=None, dtype=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])

    mamba_mixer.HAVE_MAMBA_SSM = True  # only the constructor checks it; no forward runs on CPU
    mamba_mixer.HAVE_EINOPS = True
    mamba_context_parallel.HAVE_EINOPS = True
    mamba_mixer.ExtendedRMSNorm = GatedNorm
    mamba_block.TENorm = WrappedTorchNorm


def build_mamba_model(args: Namespace, cpu: bool = True):
    """This rank's MambaModel stage for the checkpoint's args (float32, eval mode)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.mamba.mamba_model import MambaModel

    if cpu:
        _patch_cpu()
        spec = _cpu_spec()
    else:
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec as spec
    model = MambaModel(
        config=mamba_config(args, cpu), mamba_stack_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), hybrid_override_pattern=args.hybrid_override_pattern,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=int(getattr(args, "rotary_base", 10000)),
    )
    return model.eval()
