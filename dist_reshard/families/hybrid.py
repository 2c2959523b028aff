"""Mamba hybrids: Megatron-Core's MambaModel (MambaStack) against transformers' Nemotron-H and Mamba-2.

Every HF layer is a norm plus one mixer; its kind comes from the hybrid pattern (`M` Mamba-2 mixer, `*`
attention, `-` MLP) and decides which rows apply (`where`). In Megatron's TE spec the layer's norm is fused
into the first linear of its mixer (`layer_norm_weight`). The Mamba-2 in_proj rows are [z | x | B | C | dt]
and the depthwise conv1d channels [x | B | C] in both projects; Megatron splits each section by TP
separately (z, x by d_inner, B, C by whole groups, dt by heads) and concatenates them per rank, and its
torch_dist stores each section under its own key (`in_proj.weight.z`, ...). A_log, D, dt_bias and the
gated norm split by heads / d_inner; out_proj is row-parallel. MambaStack keys every layer
`decoder.layers.{g}.` in torch_dist.
"""

from ..base.errors import ConversionError
from .mapping import Family, Kind, rule

HF_LAYER = "backbone.layers.{i}."
IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
CONV_PARTS = ("x", "B", "C")


def _row(megatron, hf, kind, **kw):
    return rule(megatron, hf, kind, hf_layer=HF_LAYER, **kw)


def _heads(c):
    return [(c.mamba_num_heads,)]


def _conv_rows(c):
    return sum(c.mamba_conv_parts)


EMBEDDING = (rule("embedding.word_embeddings.weight", "backbone.embeddings.weight", Kind.VOCAB, layer=False),)

MAMBA = (
    _row("mixer.in_proj.layer_norm_weight", "norm.weight", Kind.REPLICATED, where="M"),
    _row("mixer.in_proj.weight", "mixer.in_proj.weight", Kind.PARTS, where="M",
         parts=lambda c: c.mamba_in_proj_parts, dist_parts=IN_PROJ_PARTS,
         shape=lambda c: [(sum(c.mamba_in_proj_parts), c.hidden_size)]),
    _row("mixer.conv1d.weight", "mixer.conv1d.weight", Kind.PARTS, where="M",
         parts=lambda c: c.mamba_conv_parts, dist_parts=CONV_PARTS,
         shape=lambda c: [(_conv_rows(c), 1, c.mamba_conv_kernel)]),
    _row("mixer.conv1d.bias", "mixer.conv1d.bias", Kind.PARTS, where="M",
         parts=lambda c: c.mamba_conv_parts, dist_parts=CONV_PARTS, shape=lambda c: [(_conv_rows(c),)]),
    _row("mixer.A_log", "mixer.A_log", Kind.COLUMN, where="M", shape=_heads),
    _row("mixer.D", "mixer.D", Kind.COLUMN, where="M", shape=_heads),
    _row("mixer.dt_bias", "mixer.dt_bias", Kind.COLUMN, where="M", shape=_heads),
    _row("mixer.norm.weight", "mixer.norm.weight", Kind.COLUMN, where="M", shape=lambda c: [(c.mamba_d_inner,)]),
    _row("mixer.out_proj.weight", "mixer.out_proj.weight", Kind.ROW, where="M",
         shape=lambda c: [(c.hidden_size, c.mamba_d_inner)]),
)

ATTENTION = (
    _row("self_attention.linear_qkv.layer_norm_weight", "norm.weight", Kind.REPLICATED, where="*"),
    _row("self_attention.linear_qkv.weight", ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
         Kind.QKV, where="*"),
    _row("self_attention.linear_proj.weight", "mixer.o_proj.weight", Kind.ROW, where="*"),
)

# Nemotron-H's MLP is not gated: up -> squared ReLU -> down.
MLP = (
    _row("mlp.linear_fc1.layer_norm_weight", "norm.weight", Kind.REPLICATED, where="-"),
    _row("mlp.linear_fc1.weight", "mixer.up_proj.weight", Kind.COLUMN, where="-",
         shape=lambda c: [(c.ffn_hidden_size, c.hidden_size)]),
    _row("mlp.linear_fc2.weight", "mixer.down_proj.weight", Kind.ROW, where="-"),
)

FINAL = (
    rule("decoder.final_norm.weight", "backbone.norm_f.weight", Kind.REPLICATED, layer=False),
    rule("output_layer.weight", "lm_head.weight", Kind.VOCAB, layer=False, tied_to="embedding.word_embeddings.weight"),
)


class Hybrid(Family):
    def check(self, cfg) -> None:
        """What Megatron-Core's MambaModel cannot express, refused by name."""
        if "E" in cfg.layer_kinds:
            layer = cfg.layer_kinds.index("E")
            raise ConversionError(f"config.json: layer {layer} is a mixture-of-experts layer ('E' in the hybrid "
                                  f"pattern); dist_reshard converts Mamba hybrids with M, * and - layers only")
        if "-" in cfg.layer_kinds and not cfg.squared_relu:
            act = cfg.raw.get("mlp_hidden_act", "not squared_relu (args)")
            raise ConversionError(f"config.json: mlp_hidden_act {act!r}: only relu2 (Megatron's squared_relu) MLPs "
                                  f"are supported in hybrids with mamba layers")
        if cfg.mamba_num_heads % cfg.mamba_num_groups:
            raise ConversionError(f"config.json: mamba heads {cfg.mamba_num_heads} are not divisible into "
                                  f"n_groups {cfg.mamba_num_groups} (Megatron-Core's mixer requires it)")
        for field in ("use_bias", "mamba_proj_bias"):
            if cfg.raw.get(field):
                raise ConversionError(f"config.json: {field} = true: Megatron-Core's Mamba mixer has no "
                                      f"in_proj/out_proj bias")
        if cfg.raw.get("mamba_conv_bias", cfg.raw.get("use_conv_bias")) is False:
            raise ConversionError("config.json: use_conv_bias = false: Megatron-Core's Mamba mixer always has a "
                                  "conv1d bias")


NEMOTRON_H = Hybrid("nemotron_h", ("NemotronHForCausalLM",), EMBEDDING + MAMBA + ATTENTION + MLP + FINAL)
MAMBA2 = Hybrid("mamba2", ("Mamba2ForCausalLM",), EMBEDDING + MAMBA + FINAL)

