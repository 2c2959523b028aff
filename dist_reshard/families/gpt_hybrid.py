"""A GPT model laid out as a MambaModel, as Megatron-LM's tools/checkpoint/gpt_mamba_conversion.py maps it:
GPT layer i's attention becomes the i-th `*` layer of the pattern, its MLP the i-th `-` layer; norms, SwiGLU
and the rotary embedding stay as they are, the final norm is MambaStack's `final_norm`. `M` layers have no GPT
source and are refused (nothing is invented), and so is any order other than `*-*-...`, which would compute
something else. The layout is a relabelling of the GPT family's own table (`Rule.where` by layer kind) plus
`ModelConfig.hf_layers`, the HF layer of each Megatron layer.
"""

import dataclasses

from ..base.errors import ConversionError
from .mapping import LAYER, Family

_GPT_FINAL_NORM = "decoder.final_layernorm.weight"


def _relabel(r):
    if r.megatron == _GPT_FINAL_NORM:
        return dataclasses.replace(r, megatron="decoder.final_norm.weight")
    if not r.per_layer:
        return r
    return dataclasses.replace(r, where="*" if r.megatron.startswith(LAYER + "self_attention.") else "-")


def gpt_as_hybrid(family: Family) -> Family:
    """The family's table with each layer row placed in attention (`*`) or MLP (`-`) layers."""
    if any(r.per_layer and not r.megatron.startswith(LAYER) for r in family.rules):
        raise ConversionError(f"--layer-pattern: {family.name} has more than one decoder stack (or a prefixed one); "
                              f"only a plain GPT decoder maps onto a MambaModel")
    if any("q_layernorm" in r.megatron for r in family.rules):
        # mamba_stack_spec's attention layers are linear_qkv, core attention and linear_proj only.
        raise ConversionError(f"--layer-pattern: {family.name} has q/k layernorms, which the attention layers of "
                              f"Megatron-Core's MambaModel (mamba_stack_spec) do not have")
    if any(r.megatron.endswith("layernorm.bias") or r.megatron.endswith("layer_norm_bias") for r in family.rules):
        # Nemotron-4's LayerNorms (bias, 1 + weight) in a MambaModel are untested here: not guessed.
        raise ConversionError(f"--layer-pattern: {family.name} has LayerNorms with a bias; only RMSNorm GPT models "
                              f"are laid out as a MambaModel")
    return Family(family.name, family.architectures, tuple(_relabel(r) for r in family.rules))


def gpt_layers_as_hybrid(cfg, pattern: str, where: str = "--layer-pattern"):
    """The config of a GPT model laid out by `pattern` (each Megatron layer's HF layer in `hf_layers`)."""
    if cfg.hybrid:
        raise ConversionError(f"{where} {pattern}: {cfg.architecture} is already a Mamba hybrid")
    if cfg.num_experts or cfg.mla:
        raise ConversionError(f"{where} {pattern}: {cfg.architecture} has experts or multi-latent attention; "
                              f"only dense GPT models map onto attention and MLP layers")
    bad = sorted(set(pattern) - set("*-"))
    if bad:
        raise ConversionError(f"{where} {pattern}: symbol {bad[0]!r}: a GPT model has only attention (*) and "
                              f"MLP (-) layers to place (mamba layers would need new weights)")
    if pattern != "*-" * cfg.num_layers:
        # Megatron-LM's tool pairs the i-th '*' and the i-th '-' with GPT layer i in any order; only this order
        # computes what the GPT model computes.
        raise ConversionError(f"{where} {pattern}: the {cfg.num_layers}-layer GPT model is attention then MLP in "
                              f"every layer: the pattern must be '*-' x {cfg.num_layers} "
                              f"({'*-' * cfg.num_layers}); another order would change what the model computes")
    hf_layers = [m // 2 for m in range(len(pattern))]
    return dataclasses.replace(cfg, num_layers=len(pattern), layer_kinds=tuple(pattern), hf_layers=tuple(hf_layers))


def gpt_layout(cfg):
    """A GPT model laid out as a hybrid, back in GPTModel's layers."""
    return dataclasses.replace(cfg, num_layers=len(cfg.hf_layers) // 2, layer_kinds=(), hf_layers=())


def relayout(cfg, family: Family, pattern: str) -> tuple:
    """(config, family) of the output for `--layer-pattern PATTERN|gpt`."""
    if cfg.hybrid and not cfg.hf_layers:
        raise ConversionError(f"--layer-pattern {pattern}: the source is a {cfg.architecture} Mamba hybrid; only a "
                              f"GPT model (or one laid out as attention and MLP layers) can be laid out again")
    if cfg.hf_layers:
        from . import family_for

        cfg, family = gpt_layout(cfg), family_for(cfg.architecture)
    if pattern == "gpt":
        return cfg, family
    return gpt_layers_as_hybrid(cfg, pattern), gpt_as_hybrid(family)
