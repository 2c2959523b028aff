"""Test harness: Megatron-Core's LLaVAModel built from a converted checkpoint's args, on CPU (FORMATS.md 8).

Test-side steps beyond `mcore_cpu.apply_cpu_patches`: `vision_model_type` / `language_model_type` set on
the configs (LLaVAModel reads them); `CLIPViTModel`'s default norm (torch.nn.LayerNorm without TE, which
takes no `config`) replaced by WrappedTorchNorm; the local ViT spec's attention made unmasked, as the
TransformerEngine ViT spec that Megatron-LM trains with is (`AttnMaskType.no_mask`; the local spec asks for
a causal mask, which CLIP never uses).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from dist_reshard.testing import mcore_cpu


def _patch_clip_norm() -> None:
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    defaults = list(CLIPViTModel.__init__.__defaults__)
    defaults[0] = defaults[1] = WrappedTorchNorm  # ln_pre_impl, ln_post_impl
    CLIPViTModel.__init__.__defaults__ = tuple(defaults)


def _activation(name: str):
    from megatron.core.activations import fast_gelu, quick_gelu

    # SigLIP's gelu_pytorch_tanh is GELU's tanh approximation: Megatron's fast_gelu, which examples/multimodal's
    # siglip preset runs (the same formula, computed unfused).
    return {"quick_gelu": quick_gelu, "gelu": torch.nn.functional.gelu, "gelu_pytorch_tanh": fast_gelu}[name]


def build_llava_model(args, seq_len: int):
    """This rank's LLaVAModel (local specs, float32, eval): vision encoder and projector on the first stage.
    With PP, LLaVAModel pads every sequence to its language length: `seq_len`, the image and text tokens."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_mlp_module_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    mcore_cpu.apply_cpu_patches()
    _patch_clip_norm()
    language = mcore_cpu._transformer_config(args)
    language.language_model_type = args.language_model_type
    vision = dataclasses.replace(
        copy.deepcopy(language), num_layers=args.encoder_num_layers, hidden_size=args.vision_hidden_size,
        ffn_hidden_size=args.vision_ffn_hidden_size, num_attention_heads=args.vision_num_attention_heads,
        num_query_groups=args.vision_num_attention_heads, kv_channels=args.vision_kv_channels,
        gated_linear_unit=False, activation_func=_activation(args.vision_activation), normalization="LayerNorm",
        layernorm_epsilon=args.vision_norm_epsilon, add_bias_linear=True, add_qkv_bias=True,
        bias_activation_fusion=False, pipeline_model_parallel_size=1, qk_layernorm=False,
        window_size=None)  # the language model's sliding window (Mistral) is not the vision tower's
    vision.vision_model_type = args.vision_model_type
    projection = dataclasses.replace(
        copy.deepcopy(language), ffn_hidden_size=args.vision_projection_ffn_hidden_size, gated_linear_unit=False,
        activation_func=_activation(args.vision_projection_activation), add_bias_linear=True,
        bias_activation_fusion=False, pipeline_model_parallel_size=1, window_size=None)
    vit_spec = get_vit_layer_with_local_spec()
    vit_spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    first = ps.is_pipeline_first_stage()
    model = LLaVAModel(
        language_transformer_config=language,
        language_transformer_layer_spec=get_gpt_layer_local_spec(),
        language_vocab_size=args.padded_vocab_size,
        language_max_sequence_length=seq_len,
        vision_transformer_config=vision,
        vision_transformer_layer_spec=vit_spec,
        drop_vision_class_token=args.disable_vision_class_token,
        vision_projection_config=projection,
        vision_projection_layer_spec=get_mlp_module_spec(use_te=False).submodules,
        vision_projection_type=args.vision_projection_type,
        parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        language_position_embedding_type="rope",
        language_rotary_base=args.rotary_base,
        pre_process=first,
        post_process=ps.is_pipeline_last_stage(),
        add_encoder=first,
        add_decoder=True,
        img_h=args.img_h, img_w=args.img_w, patch_dim=args.patch_dim,
        image_token_index=args.image_token_index,
    )
    return model.eval()


def llava_logits(model, images: torch.Tensor, input_ids: torch.Tensor, seq_len: int, vocab: int) -> torch.Tensor:
    """Full logits [b, seq_len, vocab] on every rank, the pipeline run by hand (hidden states [s, b, h])."""
    from megatron.core import parallel_state as ps

    b = input_ids.shape[0]
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    mask = torch.triu(torch.ones(seq_len, seq_len), 1).bool()[None, None]
    hidden = model.config.hidden_size
    with torch.no_grad():
        if pp_rank > 0:
            buf = torch.empty(seq_len, b, hidden)
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        # One tile per image, said explicitly: later stages see no images to count them from.
        tiles = torch.ones(images.shape[0], dtype=torch.int)
        out, _ = model(images if pp_rank == 0 else None, input_ids, None, mask, num_image_tiles=tiles)
        if pp_rank < pp - 1:
            dist.send(out.float().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = torch.empty(b, seq_len, vocab)
        else:
            out = out.float()[..., :vocab].contiguous()
        if pp > 1:
            dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
    return out
