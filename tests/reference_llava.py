"""Reference LLaVA transform, written from the facts (FORMATS.md, Megatron-Core's CLIPViTModel, ViT local spec,
MultimodalProjector and LLaVAModel) independently of the planner: an HF LLaVA state dict (save_pretrained's
names; a CLIP or SigLIP tower) in, the legacy rank files of a TP-only local-spec LLaVAModel out."""

from __future__ import annotations


from reference import fused_qkv, legacy_files


def _vision(hf: dict, layers: int, heads: int, tp: int, r: int, siglip: bool) -> dict:
    """CLIPViTModel: MHA fused QKV per head [q_h; k_h; v_h] split by whole heads; fc1 (and its bias) by rows,
    linear_proj / fc2 by columns; norms, row-parallel biases, embeddings whole on every rank."""
    def rows(t):
        return t.chunk(tp)[r]

    def cols(t):
        return t.chunk(tp, dim=1)[r].contiguous()

    e = "vision_tower.embeddings."
    out = {"vision_model.conv1.weight": hf[e + "patch_embedding.weight"],
           "vision_model.position_embeddings.weight": hf[e + "position_embedding.weight"]}
    if siglip:  # subtype siglip: a conv1 bias, no class token or ln_pre; ln_post is the tower's post_layernorm
        out.update({"vision_model.conv1.bias": hf[e + "patch_embedding.bias"],
                    "vision_model.ln_post.weight": hf["vision_tower.post_layernorm.weight"],
                    "vision_model.ln_post.bias": hf["vision_tower.post_layernorm.bias"]})
    else:
        out.update({"vision_model.class_token": hf[e + "class_embedding"].reshape(1, 1, -1),
                    "vision_model.ln_pre.weight": hf["vision_tower.pre_layrnorm.weight"],
                    "vision_model.ln_pre.bias": hf["vision_tower.pre_layrnorm.bias"]})
    for i in range(layers):
        p, m = f"vision_tower.encoder.layers.{i}.", f"vision_model.decoder.layers.{i}."
        qkv = [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        qkv_bias = [hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]
        out.update({
            m + "input_layernorm.weight": hf[p + "layer_norm1.weight"],
            m + "input_layernorm.bias": hf[p + "layer_norm1.bias"],
            m + "self_attention.linear_qkv.weight": rows(fused_qkv(*qkv, heads)),
            m + "self_attention.linear_qkv.bias": rows(fused_qkv(*qkv_bias, heads)),
            m + "self_attention.linear_proj.weight": cols(hf[p + "self_attn.out_proj.weight"]),
            m + "self_attention.linear_proj.bias": hf[p + "self_attn.out_proj.bias"],
            m + "pre_mlp_layernorm.weight": hf[p + "layer_norm2.weight"],
            m + "pre_mlp_layernorm.bias": hf[p + "layer_norm2.bias"],
            m + "mlp.linear_fc1.weight": rows(hf[p + "mlp.fc1.weight"]),
            m + "mlp.linear_fc1.bias": rows(hf[p + "mlp.fc1.bias"]),
            m + "mlp.linear_fc2.weight": cols(hf[p + "mlp.fc2.weight"]),
            m + "mlp.linear_fc2.bias": hf[p + "mlp.fc2.bias"],
        })
    q = "multi_modal_projector."
    out.update({"vision_projection.encoder.linear_fc1.weight": rows(hf[q + "linear_1.weight"]),
                "vision_projection.encoder.linear_fc1.bias": rows(hf[q + "linear_1.bias"]),
                "vision_projection.encoder.linear_fc2.weight": cols(hf[q + "linear_2.weight"]),
                "vision_projection.encoder.linear_fc2.bias": hf[q + "linear_2.bias"]})
    return out


def llava_legacy_files(hf: dict, config, tp: int, pp: int = 1) -> dict:
    """{(tp_rank, pp_rank): {key: tensor}}: the vision encoder (the layers up to `vision_feature_layer`: -2 of
    N is N - 1 layers, -1 all of them) and the projector on the first stage; the language model is the GPT
    reference under `language_model.`."""
    v = config.vision_config
    feature = config.vision_feature_layer
    layers = feature if feature >= 0 else v.num_hidden_layers + 1 + feature
    siglip = v.model_type == "siglip_vision_model"
    text = {k.replace("language_model.model.", "model.", 1).replace("language_model.lm_head.", "lm_head.", 1): t
            for k, t in hf.items() if k.startswith("language_model.")}
    language = legacy_files(text, config.text_config, tp, pp, None, "local")
    return {(r, p): dict(_vision(hf, layers, v.num_attention_heads, tp, r, siglip) if p == 0 else {},
                         **{"language_model." + k: t for k, t in language[(r, p)]["model"].items()})
            for r in range(tp) for p in range(pp)}
