"""LLaVA's `config.json` (`LlavaForConditionalGeneration`): the language model's facts, with the CLIP (or
SigLIP) vision encoder as a second layer stack (`ModelConfig.stacks`, name "vision").

Megatron's CLIPViTModel returns the output of its last layer, without the final LayerNorm; HF LLaVA takes
`hidden_states[vision_feature_layer]` of its CLIP tower (index 0 is the input of layer 0, after
`pre_layrnorm`), so Megatron builds `vision_feature_layer` layers when it counts from the front and
`num_hidden_layers + 1 + vision_feature_layer` when from the back (-2, the default: all but the last one).
The CLIP layers past those and `post_layernorm` take no part in LLaVA's forward.
`vision_feature_select_strategy` "default" drops the class token (Megatron's `drop_vision_class_token`),
"full" keeps it.

A SigLIP tower (`siglip_vision_model`) has no class token and no pre-norm; Megatron's CLIPViTModel (subtype
"siglip") always applies `ln_post` after its last layer, while HF LLaVA takes the hidden state before
`post_layernorm` unless the vision config says `tie_last_hidden_states: true` (then `hidden_states[-1]` is the
post-normed output). They agree only there: every layer, read at the last one (-1 or N), post-normed, and the
strategy "full" ("default" would drop the first patch, which LLaVAModel refuses for SigLIP).

Published configs often write only the fields that differ from transformers' defaults, so the defaults of
`LlamaConfig` / `MistralConfig` and of LlavaConfig's CLIP vision config (or SiglipVisionConfig) fill what is missing.
"""

from __future__ import annotations

import dataclasses

from ..base.dtypes import HF_DTYPE_FLAGS
from ..base.errors import ConversionError

TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, sliding_window=4096),
}
TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# LlavaConfig's CLIP vision config (CLIP ViT-L/14 at 336 px).
VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14, image_size=336, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
# SiglipVisionConfig's defaults (SigLIP base, 224 px); no class token, so its positions are the patches alone.
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=224, num_channels=3, layer_norm_eps=1e-6,
                       hidden_act="gelu_pytorch_tanh")
VISION_TOWERS = {"clip_vision_model": ("clip", VISION_DEFAULTS, "CLIPVisionModel"),
                 "siglip_vision_model": ("siglip", SIGLIP_DEFAULTS, "SiglipVisionModel")}
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


def _sub(cfg: dict, key: str, path: str) -> dict:
    sub = cfg.get(key)
    if not isinstance(sub, dict):
        raise ConversionError(f"{path}: field {key!r} is missing or not an object (a LLaVA config has both "
                              f"text_config and vision_config)")
    return sub


def vision_layers(feature_layer, num_layers: int, path: str) -> int:
    """How many CLIP layers Megatron builds so that its output is HF's `hidden_states[feature_layer]`."""
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ConversionError(f"{path}: vision_feature_layer = {feature_layer!r}: Megatron-Core's LLaVAModel takes "
                              f"the features of one vision layer, not a concatenation of several")
    built = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= built <= num_layers:
        raise ConversionError(f"{path}: vision_feature_layer = {feature_layer} selects the vision embeddings or a "
                              f"layer past the {num_layers} CLIP layers; Megatron-Core's CLIPViTModel returns the "
                              f"output of a layer (1 to {num_layers})")
    return built


def llava_config(cfg: dict, path: str, config_from_dict):
    """`config_from_dict` reads the text config (hf_config's reader, which hands LLaVA's configs to this one)."""
    text = _sub(cfg, "text_config", path)
    vision = _sub(cfg, "vision_config", path)
    text_type = text.get("model_type", "llama")
    if text_type not in TEXT_DEFAULTS:
        raise ConversionError(f"{path}: text_config.model_type = {text_type!r}: LLaVA conversion supports Llama and "
                              f"Mistral language models")
    vision_type = vision.get("model_type", "clip_vision_model")
    if vision_type not in VISION_TOWERS:
        raise ConversionError(f"{path}: vision_config.model_type = {vision_type!r}: supported vision towers: "
                              f"{', '.join(VISION_TOWERS)} (others have no Megatron-Core CLIPViTModel subtype)")
    subtype, defaults, vision_arch = VISION_TOWERS[vision_type]
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConversionError(f"{path}: vision_feature_select_strategy = {strategy!r} is not 'default' or 'full'")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{path}: projector_hidden_act = {act!r}: Megatron-Core's projector runs the exact "
                              f"GELU of the converted checkpoint's args; only 'gelu' is supported")
    if cfg.get("multimodal_projector_bias", True) is not True:
        raise ConversionError(f"{path}: multimodal_projector_bias = false: the LLaVA projector is converted with "
                              f"its biases (Megatron's MLP projector with add_bias_linear)")
    v = dict(defaults, **{k: x for k, x in vision.items() if x is not None})
    if not all(isinstance(v[k], int) and not isinstance(v[k], bool) for k in ("image_size", "patch_size")):
        raise ConversionError(f"{path}: vision_config.image_size / patch_size = {v['image_size']!r} / "
                              f"{v['patch_size']!r}: Megatron-Core's CLIPViTModel takes square images (integers)")
    if v["hidden_act"] not in VISION_ACTIVATIONS:
        raise ConversionError(f"{path}: vision_config.hidden_act = {v['hidden_act']!r}: supported: "
                              f"{', '.join(VISION_ACTIVATIONS)}")
    if v["num_channels"] != 3:
        raise ConversionError(f"{path}: vision_config.num_channels = {v['num_channels']}: Megatron-Core's "
                              f"CLIPViTModel takes 3-channel images")
    if v["image_size"] < v["patch_size"]:
        raise ConversionError(f"{path}: vision_config.image_size {v['image_size']} is smaller than patch_size "
                              f"{v['patch_size']}")
    built = vision_layers(cfg.get("vision_feature_layer", -2), v["num_hidden_layers"], path)
    if subtype == "siglip":
        _check_siglip(cfg, v, built, strategy, path)
    heads = v["num_attention_heads"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vision_cfg = config_from_dict(dict(
        architectures=[vision_arch], model_type=vision_type, hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_hidden_layers=built, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=1, max_position_embeddings=patches + (subtype == "clip"),
        rms_norm_eps=v["layer_norm_eps"]), f"{path} (vision_config)")
    vision_cfg = dataclasses.replace(vision_cfg, raw=v)
    text_full = dict(TEXT_DEFAULTS[text_type], **{k: x for k, x in text.items() if x is not None})
    text_full["architectures"] = [TEXT_ARCHITECTURES[text_type]]
    text_full.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    lm = config_from_dict(text_full, f"{path} (text_config)")
    return dataclasses.replace(lm, architecture=cfg["architectures"][0], model_type=str(cfg.get("model_type", "llava")),
                               tie_word_embeddings=bool(cfg.get("tie_word_embeddings", lm.tie_word_embeddings)),
                               dtype=lm.dtype or _dtype(cfg), raw=cfg, stacks=(("vision", vision_cfg),))


def _image_size(v: dict) -> int:
    """Megatron's img_h / img_w: the pixels the patch grid covers. HF's patch conv (stride = kernel = patch) floors
    the grid and ignores the remainder (SigLIP so400m: 384 px in 27 x 27 patches of 14); CLIPViTModel asserts
    that img_h is a multiple of patch_dim, and its conv1 floors the same way."""
    return v["image_size"] // v["patch_size"] * v["patch_size"]


def _check_siglip(cfg: dict, v: dict, built: int, strategy: str, path: str) -> None:
    """The one SigLIP configuration Megatron's CLIPViTModel computes: ln_post on the last layer's output."""
    if built != v["num_hidden_layers"] or v.get("tie_last_hidden_states") is not True:
        raise ConversionError(
            f"{path}: vision_feature_layer = {cfg.get('vision_feature_layer', -2)} with a SigLIP tower whose "
            f"vision_config.tie_last_hidden_states = {v.get('tie_last_hidden_states')!r}: HF LLaVA takes that hidden "
            f"state before post_layernorm, but Megatron-Core's CLIPViTModel (siglip) always applies ln_post after its "
            f"last layer; only the last layer (-1) with tie_last_hidden_states = true (post-normed) converts")
    if strategy != "full":
        raise ConversionError(f"{path}: vision_feature_select_strategy = {strategy!r} with a SigLIP tower drops its "
                              f"first patch (SigLIP has no class token); Megatron-Core's LLaVAModel keeps every "
                              f"SigLIP feature: only 'full' converts")


def _dtype(cfg: dict):
    d = cfg.get("dtype", cfg.get("torch_dtype"))
    return HF_DTYPE_FLAGS.get(d) if isinstance(d, str) else None


def llava_args(cfg) -> dict:
    """What Megatron-LM's LLaVA training (pretrain_vlm.py, examples/multimodal) reads to build the model, and
    the vision encoder's own sizes (its config is the language config with these replaced)."""
    if not cfg.stacks:
        return {}
    vision = cfg.stack("vision")
    v = vision.raw
    subtype = VISION_TOWERS[vision.model_type][0]
    return dict(
        vision_model_type=subtype,
        language_model_type=cfg.raw.get("text_config", {}).get("model_type", "llama"),
        encoder_num_layers=vision.num_layers,
        decoder_num_layers=cfg.num_layers,
        img_h=_image_size(v), img_w=_image_size(v), patch_dim=v["patch_size"],
        class_token_len=int(subtype == "clip"),  # LLaVAModel asserts none for SigLIP
        disable_vision_class_token=cfg.raw.get("vision_feature_select_strategy", "default") == "default",
        vision_projection_type="mlp",
        vision_projection_ffn_hidden_size=cfg.hidden_size,
        vision_projection_activation="gelu",
        vision_hidden_size=vision.hidden_size,
        vision_ffn_hidden_size=vision.ffn_hidden_size,
        vision_num_attention_heads=vision.num_attention_heads,
        vision_kv_channels=vision.kv_channels,
        vision_norm_epsilon=vision.norm_epsilon,
        vision_activation=v["hidden_act"],
        vision_normalization="LayerNorm",
        image_token_index=cfg.raw.get("image_token_index", cfg.raw.get("image_token_id")),
        special_tokens=["<image>"],
        # examples/multimodal's flags for one untiled image per sample, the encoder on the first stage.
        pixel_shuffle=False, use_tiling=False, max_num_tiles=1, use_thumbnail=False, use_tile_tags=False,
        image_tag_type="", encoder_pipeline_model_parallel_size=0, encoder_tensor_model_parallel_size=0,
    )


_VISION_ARGS = ("vision_hidden_size", "vision_ffn_hidden_size", "vision_num_attention_heads", "vision_norm_epsilon",
                "vision_activation", "encoder_num_layers", "img_h", "patch_dim", "image_token_index")


def llava_hf_config_from_args(args, where: str) -> dict:
    """A LLaVA config.json rebuilt from a converted checkpoint's args (when it carries no `hf_config`): the CLIP or
    SigLIP tower with exactly the layers Megatron holds, read at the last one (`vision_feature_layer` -1)."""
    missing = [k for k in _VISION_ARGS if getattr(args, k, None) is None]
    if missing:
        raise ConversionError(f"{where}: a LLaVA checkpoint (vision_model_type {args.vision_model_type!r}) whose args "
                              f"lack {missing[0]!r} and hf_config: the vision encoder's sizes are unknown")
    towers = {subtype: hf_type for hf_type, (subtype, _, _) in VISION_TOWERS.items()}
    if args.vision_model_type not in towers:
        raise ConversionError(f"{where}: vision_model_type {args.vision_model_type!r}: supported: "
                              f"{', '.join(towers)}")
    siglip = args.vision_model_type == "siglip"
    heads = args.num_attention_heads
    text = dict(model_type=getattr(args, "language_model_type", "llama"), hidden_size=args.hidden_size,
                intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=heads,
                num_key_value_heads=getattr(args, "num_query_groups", None) or heads,
                head_dim=getattr(args, "kv_channels", None) or args.hidden_size // heads,
                vocab_size=getattr(args, "true_vocab_size", None) or args.padded_vocab_size,
                max_position_embeddings=args.max_position_embeddings, rms_norm_eps=getattr(args, "layernorm_epsilon", None) or args.norm_epsilon,
                rope_theta=args.rotary_base, tie_word_embeddings=not args.untie_embeddings_and_output_weights)
    vision = dict(model_type=towers[args.vision_model_type], hidden_size=args.vision_hidden_size,
                  intermediate_size=args.vision_ffn_hidden_size, num_hidden_layers=args.encoder_num_layers,
                  num_attention_heads=args.vision_num_attention_heads, image_size=args.img_h,
                  patch_size=args.patch_dim, num_channels=3, layer_norm_eps=args.vision_norm_epsilon,
                  hidden_act=args.vision_activation)
    if siglip:  # the post-normed last layer, as Megatron's ln_post gives it; no pooling head (LLaVA never uses it)
        vision.update(tie_last_hidden_states=True, vision_use_head=False)
    keep_class_token = not (siglip or args.disable_vision_class_token)
    return dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava", text_config=text, vision_config=vision,
        vision_feature_layer=-1, image_token_index=args.image_token_index, projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if siglip or keep_class_token else "default",
        image_seq_length=(args.img_h // args.patch_dim) ** 2 + keep_class_token,
        tie_word_embeddings=text["tie_word_embeddings"])
