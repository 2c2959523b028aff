"""LLaVA (`LlavaForConditionalGeneration`) <-> Megatron-Core's LLaVAModel: three parts, one table each.

- `vision_model.`: CLIPViTModel, a second layer stack ("vision", its own layer count and MHA geometry:
  the fused QKV interleaves q, k, v per head), wholly on the first pipeline stage, TP-split like GPT layers,
  with biases and LayerNorm weight + bias. `class_token` is [1, 1, H] where HF's `class_embedding` is [H].
- `vision_projection.encoder.`: the two-layer GELU MLP (`linear_fc1` column-, `linear_fc2` row-parallel).
- `language_model.`: the Llama/Mistral GPT table, HF names under `language_model.`.

HF names are what transformers 5's `save_pretrained` writes (`language_model.model.…`,
`language_model.lm_head.weight`, `vision_tower.embeddings.…`, `vision_tower.encoder.layers.…`,
`multi_modal_projector.…`); its in-memory names (`model.language_model.…`, `lm_head.weight`,
`model.vision_tower.…`) and older hub checkpoints' `vision_tower.vision_model.…` are renamed on reading.
CLIP layers past the ones LLaVA uses (see llava_config.py) and the tower's `post_layernorm` are left out.
A SigLIP tower (CLIPViTModel subtype "siglip", selected by the config's `siglip` feature) has the same layers;
its embeddings differ (conv1 bias, no class token, no ln_pre), its `post_layernorm` is Megatron's `ln_post`,
and its attention-pooling `head` is left out.
"""

import dataclasses

from ..base.errors import ConversionError
from .mapping import Family, Kind, Rule, prefixed
from .llama import DENSE_DECODER

VIT = "vision_model."
VIT_LAYER = VIT + "decoder.layers.{i}."
HF_VIT = "vision_tower."
HF_VIT_LAYER = HF_VIT + "encoder.layers.{i}."
HF_PROJECTOR = "multi_modal_projector."


def _vit(megatron: str, hf, kind: Kind, local: str | None = None, **kw) -> Rule:
    """A CLIP layer row: names relative to the layer; the local spec's names are also its torch_dist keys
    (the ViT local spec has no TE-name key map)."""
    hf = (hf,) if isinstance(hf, str) else hf
    extra = dict(local=VIT_LAYER + local, local_dist_key=VIT + "decoder.layers." + local) if local else {}
    return Rule(VIT_LAYER + megatron, tuple(HF_VIT_LAYER + n for n in hf), kind, stack="vision", **extra, **kw)


def _qkv(suffix: str) -> tuple[str, ...]:
    return tuple(f"self_attn.{p}_proj.{suffix}" for p in "qkv")


def _ffn(c):
    return [(c.ffn_hidden_size,)]


def _whole(megatron: str, hf: str, **kw) -> Rule:
    """A vision tensor outside the layers: whole on every TP rank of the first stage."""
    return Rule(VIT + megatron, (HF_VIT + hf,), Kind.REPLICATED, stack="vision", placement="first", **kw)


# CLIP: a class token and ln_pre (pre_layrnorm), a bias-free conv1; SigLIP ("siglip" rows): no class token, a
# conv1 bias, no ln_pre, and ln_post (post_layernorm) applied to the last layer's output.
VISION_EMBEDDINGS = (
    _whole("class_token", "embeddings.class_embedding", unsqueeze=2, when="!siglip"),
    _whole("conv1.weight", "embeddings.patch_embedding.weight",
           shape=lambda c: [(c.hidden_size, c.raw["num_channels"], c.raw["patch_size"], c.raw["patch_size"])]),
    _whole("conv1.bias", "embeddings.patch_embedding.bias", shape=lambda c: [(c.hidden_size,)], when="siglip"),
    _whole("position_embeddings.weight", "embeddings.position_embedding.weight",
           shape=lambda c: [(c.max_position_embeddings, c.hidden_size)]),
    _whole("ln_pre.weight", "pre_layrnorm.weight", when="!siglip"),
    _whole("ln_pre.bias", "pre_layrnorm.bias", when="!siglip"),
    _whole("ln_post.weight", "post_layernorm.weight", when="siglip"),
    _whole("ln_post.bias", "post_layernorm.bias", when="siglip"),
)

VISION_LAYER = (
    _vit("self_attention.linear_qkv.layer_norm_weight", "layer_norm1.weight", Kind.REPLICATED,
         local="input_layernorm.weight"),
    _vit("self_attention.linear_qkv.layer_norm_bias", "layer_norm1.bias", Kind.REPLICATED,
         local="input_layernorm.bias"),
    _vit("self_attention.linear_qkv.weight", _qkv("weight"), Kind.QKV),
    _vit("self_attention.linear_qkv.bias", _qkv("bias"), Kind.QKV),
    _vit("self_attention.linear_proj.weight", "self_attn.out_proj.weight", Kind.ROW),
    _vit("self_attention.linear_proj.bias", "self_attn.out_proj.bias", Kind.REPLICATED),
    _vit("mlp.linear_fc1.layer_norm_weight", "layer_norm2.weight", Kind.REPLICATED, local="pre_mlp_layernorm.weight"),
    _vit("mlp.linear_fc1.layer_norm_bias", "layer_norm2.bias", Kind.REPLICATED, local="pre_mlp_layernorm.bias"),
    _vit("mlp.linear_fc1.weight", "mlp.fc1.weight", Kind.COLUMN,
         shape=lambda c: [(c.ffn_hidden_size, c.hidden_size)]),
    _vit("mlp.linear_fc1.bias", "mlp.fc1.bias", Kind.COLUMN, shape=_ffn),
    _vit("mlp.linear_fc2.weight", "mlp.fc2.weight", Kind.ROW),
    _vit("mlp.linear_fc2.bias", "mlp.fc2.bias", Kind.REPLICATED),
)


def _projector(megatron: str, hf: str, kind: Kind, shape) -> Rule:
    return Rule("vision_projection.encoder." + megatron, (HF_PROJECTOR + hf,), kind, placement="first", shape=shape)


PROJECTOR = (
    _projector("linear_fc1.weight", "linear_1.weight", Kind.COLUMN,
               lambda c: [(c.hidden_size, c.stack("vision").hidden_size)]),
    _projector("linear_fc1.bias", "linear_1.bias", Kind.COLUMN, lambda c: [(c.hidden_size,)]),
    _projector("linear_fc2.weight", "linear_2.weight", Kind.ROW, lambda c: [(c.hidden_size, c.hidden_size)]),
    _projector("linear_fc2.bias", "linear_2.bias", Kind.REPLICATED, lambda c: [(c.hidden_size,)]),
)


def _language_name(hf: str) -> str:
    """Llama's HF names inside LLaVA: under `language_model.`."""
    return "language_model." + hf


LANGUAGE = prefixed(DENSE_DECODER, "language_model.", _language_name)

# Other layouts, renamed on reading: transformers 5's module names (which its save_pretrained maps back to the
# table's), then the CLIPVisionModel wrapper of older hub checkpoints (`vision_tower.vision_model.`).
_OTHER_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
_CLIP_WRAPPER = ("vision_tower.vision_model.", "vision_tower.")


class Llava(Family):
    def check(self, cfg) -> None:
        if cfg.num_experts:
            raise ConversionError("config.json: a mixture-of-experts language model inside LLaVA is not supported")

    def check_layout(self, layout, cfg) -> None:
        for flag, used in (("--vpp", layout.vpp), ("--ep", layout.ep > 1), (layout.pipeline_flags, layout.uneven)):
            if used:
                raise ConversionError(f"{flag}: not supported for LLaVA (Megatron-LM's LLaVA training puts the "
                                      f"vision encoder on the first pipeline stage, without interleaving or experts)")
        tp = layout.tp
        vision = cfg.stack("vision")
        for what, n in (("vision num_attention_heads", vision.num_attention_heads),
                        ("vision intermediate_size", vision.ffn_hidden_size)):
            if n % tp:
                raise ConversionError(f"--tp {tp}: {what} = {n} is not divisible by the tensor-parallel size "
                                      f"(LLaVAModel splits the vision encoder over the same TP ranks)")

    def source_index(self, index: dict, cfg) -> dict:
        out = {}
        for name, t in index.items():
            new = next((new + name[len(old):] for old, new in _OTHER_NAMES if name.startswith(old)), name)
            if new.startswith(_CLIP_WRAPPER[0]):
                new = _CLIP_WRAPPER[1] + new[len(_CLIP_WRAPPER[0]):]
            if _unused_vision(new, cfg):
                continue
            out[new] = dataclasses.replace(t, name=new) if new != name else t
        return out


def _unused_vision(name: str, cfg) -> bool:
    """Vision tensors LLaVA's forward never reads: layers past the selected feature layer, CLIP's post_layernorm,
    SigLIP's attention-pooling head."""
    if name.startswith(HF_VIT + ("head." if cfg.siglip else "post_layernorm.")):
        return True
    prefix = HF_VIT + "encoder.layers."
    return name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) >= cfg.stack("vision").num_layers


LLAVA = Llava("llava", ("LlavaForConditionalGeneration",), VISION_EMBEDDINGS + VISION_LAYER + PROJECTOR + LANGUAGE)
