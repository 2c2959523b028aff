"""Test harness: build and run real Megatron-Core GPTModels on CPU (gloo, torchrun).

Not part of the converter. Tests use it to check that what the converter writes is exactly what
Megatron-Core expects: strict ``load_state_dict`` of legacy files, ``dist_checkpointing.load`` of
torch_dist folders, and logits compared against Hugging Face. Megatron-Core assumes CUDA in a few
places; ``apply_cpu_patches`` papers over them in the test process only (see FORMATS.md section 8).
"""

from __future__ import annotations

import contextlib
from argparse import Namespace
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

_PATCHED = False


def apply_cpu_patches() -> None:
    """Make Megatron-Core's CUDA assumptions harmless on a CPU-only gloo process. Idempotent."""
    global _PATCHED
    if _PATCHED:
        return
    # RoPE, attention masks and the rng tracker ask for the current CUDA device; "cpu" keeps the
    # tensors they create next to the CPU parameters.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    # With tied embeddings and PP>1 the GPTModel constructor moves the embedding copy to CUDA.
    torch.Tensor.cuda = lambda self, *a, **k: self

    from megatron.core.tensor_parallel import random as mrandom

    # fork() saves/restores CUDA rng state around dropout; there is none on CPU and dropout is 0.
    # Patch the class so trackers re-created by model_parallel_cuda_manual_seed are covered too.
    mrandom.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    # add() would seed a CUDA generator; record the name only, so that "state is added" checks hold.
    mrandom.CudaRNGStatesTracker.add = lambda self, name, seed: self.states_.__setitem__(name, None)
    # MoE router uses TE's gemm when importable-looking; force the plain torch path.
    try:
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None
    except ImportError:  # pragma: no cover - MoE package always ships with mcore 0.16
        pass
    # MLA reads True here without TransformerEngine installed, then reaches for TE modules.
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False
    # The sliding-window mask is built on "cuda" by name.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    def sliding_window_mask_on_cpu(sq, skv, window_size, _build=transformer_utils.get_sliding_window_causal_mask):
        with _cuda_as_cpu():
            return _build(sq, skv, window_size)

    fused_softmax.get_sliding_window_causal_mask = sliding_window_mask_on_cpu
    _PATCHED = True


@contextlib.contextmanager
def _cuda_as_cpu():
    """torch.ones(..., device="cuda") inside Megatron helpers lands on the CPU."""
    ones = torch.ones

    def on_cpu(*a, device=None, **k):
        return ones(*a, device="cpu" if device == "cuda" else device, **k)

    torch.ones = on_cpu
    try:
        yield
    finally:
        torch.ones = ones


def init_parallel(tp: int, pp: int, vpp: int | None = None, ep: int = 1, etp: int | None = None,
                  seed: int = 1234) -> None:
    """(Re)initialise Megatron's model-parallel groups on an already initialised gloo world."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    assert dist.is_initialized(), "run under torchrun and call dist.init_process_group('gloo') first"
    apply_cpu_patches()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    # Layers look up the tracker's named states during forward; seeding registers them.
    model_parallel_cuda_manual_seed(seed)
    # use_cpu_initialization draws the full master weight from the CPU generator and slices it per
    # TP rank, so every rank must share the CPU seed for the shards to form one consistent tensor.
    torch.manual_seed(seed)


class CPUCoreAttention(torch.nn.Module):
    """Causal softmax attention on [s, b, heads, dim] inputs, for MLA layers on CPU: the local spec's
    DotProductAttention takes no separate k/v head dims, and MLA has no TE here (FORMATS.md section 8)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, softmax_scale=None,
                 k_channels=None, v_channels=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **_):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, dim]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class CPULayerNorm1P(torch.nn.LayerNorm):
    """LayerNorm with a bias scaling by 1 + weight (`layernorm_zero_centered_gamma`, Megatron-LM's
    --apply-layernorm-1p), as TE's norms and FusedLayerNorm apply it: without TE or apex the local spec's
    WrappedTorchNorm refuses the flag (FORMATS.md section 8). Parameters `weight` and `bias`, as theirs."""

    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__(hidden_size, eps=eps)

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def _zero_centred_norms(layer_spec, config, vp_stage):
    """The local layer spec as a block spec whose input, pre-MLP and final norms are CPULayerNorm1P."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, input_layernorm=CPULayerNorm1P, pre_mlp_layernorm=CPULayerNorm1P))
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=ps.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=CPULayerNorm1P)


def _transformer_config(args: Namespace):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if getattr(args, "multi_latent_attention", False):
        return MLATransformerConfig(**_common_config(args), **_mla_config(args))
    config = TransformerConfig(**_common_config(args))
    # GPTModel reads YaRN's fields off the config by name; TransformerConfig does not declare them.
    for k, v in vars(args).items():
        if k.startswith("yarn_"):
            setattr(config, k, v)
    return config


def _activation(args: Namespace) -> dict:
    """Megatron-LM's activation flags as TransformerConfig fields (squared ReLU without a gate, swiglu,
    quick-GEGLU with its offset and clamp, else GELU)."""
    from megatron.core.activations import squared_relu
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    if getattr(args, "squared_relu", False):
        return dict(gated_linear_unit=False, activation_func=squared_relu)
    if getattr(args, "quick_geglu", False):
        return dict(gated_linear_unit=True, activation_func=quick_gelu, bias_activation_fusion=False,
                    glu_linear_offset=args.glu_linear_offset,
                    activation_func_clamp_value=args.activation_func_clamp_value)
    return dict(gated_linear_unit=args.swiglu,
                activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu)


def _mla_config(args: Namespace) -> dict:
    return dict(
        q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim,
        qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim, rope_type=args.rope_type,
        rotary_base=args.rotary_base, rotary_scaling_factor=args.rotary_scaling_factor, mscale=args.mscale,
        mscale_all_dim=args.mscale_all_dim, beta_fast=args.beta_fast, beta_slow=args.beta_slow,
        original_max_position_embeddings=args.original_max_position_embeddings,
    )


def _common_config(args: Namespace) -> dict:
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        **_activation(args),
        softmax_type=getattr(args, "softmax_type", "vanilla"),
        window_size=tuple(args.window_size) if getattr(args, "window_size", None) else None,
        window_attn_skip_freq=getattr(args, "window_attn_skip_freq", None),
        normalization=args.normalization,
        layernorm_zero_centered_gamma=bool(getattr(args, "apply_layernorm_1p", False)),
        layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        rotary_interleaved=bool(getattr(args, "rotary_interleaved", False)),  # Ernie-4.5 (the unfused path)
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        # Without these each stage would build every layer (FORMATS.md section 8).
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        pipeline_dtype=torch.float32,
        # An uneven split, as Megatron-LM's core_transformer_config_from_args passes it on.
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        account_for_embedding_in_pipeline_split=bool(getattr(args, "account_for_embedding_in_pipeline_split", False)),
        account_for_loss_in_pipeline_split=bool(getattr(args, "account_for_loss_in_pipeline_split", False)),
        pipeline_model_parallel_layout=getattr(args, "pipeline_model_parallel_layout", None),
        mtp_num_layers=getattr(args, "mtp_num_layers", None),
        **_moe_config(args),
    )


def _moe_config(args: Namespace) -> dict:
    """The checkpoint's MoE args as TransformerConfig fields, with the dispatcher that runs on CPU."""
    if not getattr(args, "num_experts", None):
        return {}
    return dict(
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_score_function=args.moe_router_score_function,
        moe_layer_freq=args.moe_layer_freq,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",  # alltoall needs CUDA streams (FORMATS.md section 8)
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        **{k: getattr(args, k) for k in ("moe_router_enable_expert_bias", "moe_router_num_groups",
                                         "moe_router_group_topk", "moe_router_topk_scaling_factor",
                                         "moe_router_dtype") if getattr(args, k, None) is not None},
    )


def build_gpt_models(args: Namespace) -> List[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), local spec, float32, eval mode."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)

    apply_cpu_patches()
    config = _transformer_config(args)
    vpp = args.virtual_pipeline_model_parallel_size
    models = []
    for v in range(vpp or 1):
        vp_stage = v if vpp else None
        if getattr(args, "num_experts", None) or getattr(args, "multi_latent_attention", False):
            # The block spec places MoE and dense layers by moe_layer_freq for this stage.
            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage,
                                              pp_rank=ps.get_pipeline_model_parallel_rank())
            if getattr(args, "multi_latent_attention", False):
                for layer_spec in spec.layer_specs:
                    layer_spec.submodules.self_attention.submodules.core_attention = CPUCoreAttention
        else:
            spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm)
            if config.layernorm_zero_centered_gamma:
                spec = _zero_centred_norms(spec, config, vp_stage)
        # The multi-token-prediction block, on the stage that holds it (None elsewhere): the last decoder layer's
        # spec, as Megatron-LM builds it.
        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage,
                                          pp_rank=ps.get_pipeline_model_parallel_rank()) \
            if getattr(args, "mtp_num_layers", None) else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=getattr(args, "position_embedding_type", "rope"),
            rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base,
            rope_scaling=bool(args.use_rope_scaling),
            rope_scaling_factor=args.rope_scaling_factor,
            vp_stage=vp_stage,
            mtp_block_spec=mtp_spec,
        )
        model.eval()
        models.append(model)
    return models


def forward_logits(models: Sequence[torch.nn.Module], tokens: torch.Tensor, mtp_logits: list | None = None
                   ) -> torch.Tensor:
    """Full-vocab float32 logits [b, s, V_padded] on every rank; pipeline run by hand in schedule order.

    With multi-token-prediction layers (on the last stage), GPTModel computes their loss only from labels;
    run without, it appends their hidden states to the main ones along the sequence, so the logits of
    positions s .. (1 + k) s are the MTP layers' (put in `mtp_logits`, [b, s, V_padded] each).

    Hidden states [s, b, h] go stage to stage with blocking send/recv (the pipeline ring wraps from
    the last stage of chunk v to the first stage of chunk v+1). The last stage all-gathers the
    vocab-parallel logits over TP and broadcasts them over the pipeline group.
    """
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    hidden = models[0].config.hidden_size
    position_ids = torch.arange(s, dtype=torch.long)[None].expand(b, s).contiguous()
    mask = torch.triu(torch.ones(s, s), 1).bool()[None, None]
    config = models[0].config
    mtp = config.mtp_num_layers or 0
    config.mtp_num_layers = None  # no labels: no MTP loss (gpt_model._postprocess clones the labels otherwise)
    try:
        out = _run_pipeline(models, tokens, position_ids, mask, hidden, pp, pp_rank, b, s * (1 + mtp))
    finally:
        config.mtp_num_layers = mtp or None
    if mtp_logits is not None:
        mtp_logits.extend(out[:, s * (k + 1):s * (k + 2)] for k in range(mtp))
    return out[:, :s]


def _run_pipeline(models, tokens, position_ids, mask, hidden, pp, pp_rank, b, s_out):
    """forward_logits' pipeline: the last stage's logits, s_out positions, gathered and broadcast."""
    from megatron.core import parallel_state as ps

    s, nchunks = tokens.shape[1], len(models)
    out = None
    with torch.no_grad():
        for v in range(nchunks):
            model = models[v]
            model.eval()
            for p in range(pp):
                if p != pp_rank:
                    continue
                first = v == 0 and p == 0
                last = v == nchunks - 1 and p == pp - 1
                if not first:
                    buf = torch.empty(s, b, hidden, dtype=torch.float32)
                    dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(buf)
                else:
                    model.set_input_tensor(None)
                y = model(tokens, position_ids, mask)
                if not last:
                    dist.send(y.float().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                else:
                    out = y
        vocab = models[-1].vocab_size
        if out is not None:
            tp_group = ps.get_tensor_model_parallel_group()
            tp = ps.get_tensor_model_parallel_world_size()
            local = out.float().contiguous()
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local, group=tp_group)
            out = torch.cat(parts, dim=-1).contiguous()
        else:
            out = torch.empty(b, s_out, vocab, dtype=torch.float32)
        if pp > 1:
            dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
    return out



def sharded_state_dict(models: Sequence[torch.nn.Module]) -> Dict:
    """What dist_checkpointing.save/load take for these chunks, nested as Megatron-LM nests them.

    ``{"model": ...}`` for one chunk, ``{"model0": ..., "model1": ...}`` with VPP; the chunk's
    vp_stage already puts global layer offsets into the ShardedTensors, so the nesting never reaches
    the DCP keys. The common state (args, iteration, ...) merges in beside these keys on load.
    """
    metadata = None
    if models[0].config.mtp_num_layers:  # the MTP stage's embedding copy is tied over the data-parallel group
        from megatron.core import parallel_state as ps

        metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": m.sharded_state_dict(metadata=metadata) for i, m in enumerate(models)}


def load_torch_dist(models: Sequence[torch.nn.Module], ckpt_dir: str) -> Dict:
    """Load a torch_dist folder into the chunks the way Megatron does, strict-load each chunk, and
    return the loaded common state (args, iteration, checkpoint_version)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_state_dict(models), ckpt_dir)
    names = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for name, model in zip(names, models):
        model.load_state_dict(state.pop(name), strict=True)
    return state


def relative_difference(logits: torch.Tensor, expected: torch.Tensor) -> float:
    """The logits check's figure: max |megatron - hf| / max |hf|."""
    return ((logits - expected).abs().max() / expected.abs().max()).item()


def write_results_and_exit(results: list, path: str) -> None:
    """A test worker's end: rank 0 writes the results as JSON, then every rank leaves without waiting on
    the interpreter's teardown (Megatron's and gloo's threads can hang it)."""
    import json
    import os
    import sys

    from ..exchange import collectives

    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f)
    collectives.shutdown()
    sys.stdout.flush()
    os._exit(0)
