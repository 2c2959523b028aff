"""Tiny, seeded, random-initialised HF models of each supported family (the embedded default and tests).

Built from a transformers config, never downloaded: the demo and the test suite run on a fresh machine
with no network.
"""

from __future__ import annotations

import os

# Small enough for a 2-core CI machine, large enough that every split (heads, groups, ffn, vocab
# padding, pipeline chunks) is non-trivial; vocab 1000 is deliberately not a multiple of 128.
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5)

_DEEPSEEK = dict(rope_theta=10000.0, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                 routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=8,
                 tie_word_embeddings=False, rms_norm_eps=1e-6)

VARIANTS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=8, rope_theta=10000.0)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0)),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, max_position_embeddings=16384,
                                                          rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1000000.0, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1000000.0, head_dim=32,
                                                       tie_word_embeddings=False)),
    # Mixture of experts: 4 experts, top 2. Mixtral is MoE in every layer; the Qwens mix dense layers in
    # (Qwen2-MoE every other layer, Qwen3-MoE all but layer 0) so both torch_dist key forms are exercised.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(rope_theta=1000000.0, num_local_experts=4,
                                                            num_experts_per_tok=2, intermediate_size=96)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        rope_theta=1000000.0, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, decoder_sparse_step=2, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        rope_theta=1000000.0, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        mlp_only_layers=[0], norm_topk_prob=True, tie_word_embeddings=False)),
    # DeepSeek-V3: multi-latent attention (q LoRA 32, kv LoRA 16), layer 0 dense, then 8 routed experts in
    # 2 groups (top 2 of the best group), one shared expert, scaled weights. Moonlight: no q LoRA.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", _DEEPSEEK),
    "moonlight": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(_DEEPSEEK, q_lora_rank=None)),
}

OMIT = object()  # a BASE field a variant's config class does not have

# Families with suites of their own, kept apart from VARIANTS (whose suites run every variant).
# GPT-OSS: 4 experts, top 2, a sliding window of 4 tokens on alternate layers (the logits checks run 12), and a
# GLU clamp low enough to bite at this scale. GLM-4.5: layer 0 dense, then 8 routed experts behind the sigmoid
# router and one shared expert, q/k/v bias and q/k norms, rotary on half of each head (its default).
OWN_SUITE_VARIANTS = {
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=4,
        swiglu_limit=0.6, tie_word_embeddings=False)),
    # Phi-3: q, k, v and gate, up fused in HF; 8 heads in 4 groups so TP2 splits the fused rows by groups.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rope_theta=10000.0, tie_word_embeddings=False,
                                                   pad_token_id=0, eos_token_id=2)),
    # Nemotron-4 / Minitron: LayerNorms with a bias (1 + weight), squared-ReLU MLP without a gate, rotary on half
    # of each 16-channel head; NemotronConfig names the epsilon norm_eps (BASE's rms_norm_eps is left out).
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(
        head_dim=16, norm_eps=1e-5, rms_norm_eps=OMIT, partial_rotary_factor=0.5, rope_theta=10000.0,
        tie_word_embeddings=False)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        head_dim=16, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5, attention_bias=True,
        use_qk_norm=True, tie_word_embeddings=False)),
    # GLM-4.7-Flash: the GLM router on DeepSeek-V3's multi-latent attention (the DeepSeek sizes).
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(_DEEPSEEK, n_group=1, topk_group=1,
                                                                          routed_scaling_factor=1.8)),
    # DeepSeek-V2: the DeepSeek sizes behind a softmax router, not renormalised, top 3 of 8 experts limited to
    # the 2 best of 4 groups (the limit bites only with top-k > topk_group; 3 // 2 = 1, so HF's and Megatron's
    # group ranking agree). V2-Lite: no q LoRA, no group limit (`greedy`).
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        norm_topk_prob=False)),
    "deepseek_v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0)),
    # Ernie-4.5 MoE: layers 1-2 MoE (moe_layer_start/end_index), 0 and 3 dense; 8 routed experts, top 2, two
    # experts' worth of shared expert, interleaved rotary, tied embeddings. Its selection bias stays zero
    # (ZERO_BIAS_VARIANTS): the only value Megatron-Core's softmax router expresses.
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        head_dim=16, intermediate_size=96, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=2, tie_word_embeddings=True)),
    # Multi-token prediction: DeepSeek-V3 and GLM-4.5 declaring one MTP layer after the decoder (written by
    # `save_model(..., mtp_layers=1)` as their published checkpoints store it; transformers has no module for it).
    "deepseek_v3_mtp": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(_DEEPSEEK, num_nextn_predict_layers=1)),
    # Qwen3-Next: gated DeltaNet layers (2 key heads of 8, 4 value heads of 8, so TP2 splits whole key-head
    # groups of 2 value heads) and gated attention (8 heads of 16 in 4 groups, rotary on a quarter of each head)
    # alternating from layer 0, 4 routed experts (top 2) with a gated shared expert; layer 2 is dense
    # (mlp_only_layers) so both MLP kinds meet both mixers.
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[2], linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, full_attention_interval=2,
        rope_theta=10000.0, tie_word_embeddings=False)),
}
# Qwen3.5: Qwen3-Next's layers with split DeltaNet input projections and the multimodal rotary sections of the
# released configs (text positions make them plain rotary); dense MLPs, or experts in every layer.
_QWEN3_5 = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                linear_value_head_dim=8, linear_conv_kernel_dim=4, full_attention_interval=2, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                     mrope_interleaved=True, mrope_section=[1, 1, 0]))
OWN_SUITE_VARIANTS["qwen3_5"] = ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _QWEN3_5)
OWN_SUITE_VARIANTS["qwen3_5_moe"] = ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
    _QWEN3_5, intermediate_size=OMIT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=48))
ZERO_BIAS_VARIANTS = ("ernie4_5_moe",)
OWN_SUITE_VARIANTS["glm4_moe_mtp"] = (*OWN_SUITE_VARIANTS["glm4_moe"][:2], dict(OWN_SUITE_VARIANTS["glm4_moe"][2],
                                                                                num_nextn_predict_layers=1))

# Mamba hybrids, kept apart from VARIANTS (the GPT-family suites iterate over those): 8 mamba heads of 16 in
# 2 groups of B/C (state 16), so TP2 splits every section. Nemotron-H mixes the three layer kinds (its
# 6-layer pattern puts an attention layer on each of 2 pipeline stages); Mamba-2 is mamba only.
HYBRID_VARIANTS = {
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        hybrid_override_pattern="M*-M-*", head_dim=8, intermediate_size=96, ssm_state_size=16, mamba_num_heads=8,
        mamba_head_dim=16, n_groups=2, layer_norm_epsilon=1e-5, tie_word_embeddings=False)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        num_heads=8, head_dim=16, state_size=16, n_groups=2, expand=2, layer_norm_epsilon=1e-5,
        tie_word_embeddings=False)),
}

MOE_VARIANTS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "moonlight")


def build_model(variant: str = "llama3", seed: int = 0, dtype: str = "float32", **overrides):
    import torch
    import transformers

    config_cls, model_cls, extra = {**VARIANTS, **HYBRID_VARIANTS, **OWN_SUITE_VARIANTS}[variant]
    kw = {k: v for k, v in dict(BASE, **extra).items() if v is not OMIT}
    kw.update(overrides)
    config = getattr(transformers, config_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        # Norm weights start at 1.0; randomise them so a mis-mapped norm cannot go unnoticed.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            # incl. dt_bias, conv1d.bias, GPT-OSS's attention sinks
            if name.endswith("bias") or name.endswith(("A_log", ".D", ".sinks")):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init; make it change which experts win
                b.normal_(0.0, 0.2)
        if variant in ZERO_BIAS_VARIANTS:
            for name, p in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.zero_()
    model = model.to(getattr(torch, dtype)).eval()
    return model


def save_model(model, folder: str, max_shard_size: str = "200KB", mtp_layers: int = 0, seed: int = 0) -> str:
    """save_pretrained with small shards, so multi-file indexes are always exercised; with `mtp_layers`
    multi-token-prediction layers after the decoder, as DeepSeek-V3 and GLM-4.5 store them (transformers writes
    `num_nextn_predict_layers` 1 into their configs whatever the checkpoint holds, and saves none)."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    if mtp_layers:
        add_mtp_layers(folder, mtp_layers, seed)
    return folder


def add_mtp_layers(folder: str, count: int, seed: int = 0) -> None:
    """Multi-token-prediction layers `model.layers.{L + k}.` in a file of their own: enorm, hnorm, eh_proj, a
    decoder layer shaped like the last one (fresh random values, so a layer mixed up with it shows), its
    shared_head.norm, and copies of the embedding and head (`embed_tokens`, `shared_head.head`)."""
    import json

    import torch
    from safetensors.torch import load_file

    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        L = json.load(f)["num_hidden_layers"]
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(os.path.join(folder, file)))
    gen = torch.Generator().manual_seed(1000 + seed)
    h = state["model.norm.weight"].shape[0]
    norm = lambda: torch.rand(h, generator=gen) + 0.5  # noqa: E731
    extra = {}
    last = f"model.layers.{L - 1}."
    for k in range(count):
        p = f"model.layers.{L + k}."
        for name, t in sorted(state.items()):
            if not name.startswith(last):
                continue
            if t.dim() == 1:
                new = torch.rand(t.shape, generator=gen) + 0.5 if "norm" in name else \
                    torch.randn(t.shape, generator=gen) * 0.2
            else:
                new = torch.randn(t.shape, generator=gen) * t.float().std()
            extra[p + name[len(last):]] = new.to(t.dtype)
        dtype = state["model.norm.weight"].dtype
        extra.update({p + "enorm.weight": norm().to(dtype), p + "hnorm.weight": norm().to(dtype),
                      p + "eh_proj.weight": (torch.randn(h, 2 * h, generator=gen) * 0.05).to(dtype),
                      p + "shared_head.norm.weight": norm().to(dtype),
                      p + "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                      p + "shared_head.head.weight": state["lm_head.weight"].clone()})
    add_tensors(folder, extra, "model-mtp.safetensors")


def add_tensors(folder: str, tensors: dict, file: str) -> None:
    """`tensors` added to a sharded HF folder in a safetensors file of their own, listed in its index."""
    import json

    from safetensors.torch import save_file

    save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    index["weight_map"].update(dict.fromkeys(tensors, file))
    index.setdefault("metadata", {})["total_size"] = index["metadata"].get("total_size", 0) + sum(
        t.numel() * t.element_size() for t in tensors.values())
    with open(path, "w") as f:
        json.dump(index, f, indent=2)


# LLaVA: a tiny CLIP tower (3 layers, 4 heads of 8, 32 x 32 images in 8 x 8 patches: 16 patches and a class
# token) and a tiny Llama. vision_feature_layer -2 leaves the last CLIP layer and post_layernorm unused.
LLAVA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                    patch_size=8, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
# The SigLIP variant: the same sizes, no class token (16 features), its own activation and eps, the pooling head
# kept (LLaVA never uses it), read at the post-normed last layer (the one SigLIP setting Megatron computes).
# 36 px in patches of 8 (like so400m's 384 px in 14): the conv floors to a 4 x 4 grid, Megatron's img_h is 32.
LLAVA_SIGLIP_VISION = dict(LLAVA_VISION, image_size=36, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                           vision_use_head=True, tie_last_hidden_states=True)
LLAVA_SIGLIP = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
LLAVA_IMAGE_TOKEN = 999  # the last vocabulary entry; HF repeats it once per image feature


def build_llava(seed: int = 0, dtype: str = "float32", text_model: str = "llama", vision_model: str = "clip",
                **overrides):
    """A seeded tiny LlavaForConditionalGeneration (a `vision_model` tower, clip or siglip, + the `text_model`
    variant: llama3 or mistral), norms and biases randomised."""
    import torch
    import transformers

    config_cls, _, extra = VARIANTS[{"llama": "llama3"}.get(text_model, text_model)]
    text_config = getattr(transformers, config_cls)(**dict(BASE, **extra))
    if vision_model == "siglip":
        vision_config = transformers.SiglipVisionConfig(**LLAVA_SIGLIP_VISION)
        overrides = dict(LLAVA_SIGLIP, **overrides)
    else:
        vision_config = transformers.CLIPVisionConfig(**LLAVA_VISION)
    config = transformers.LlavaConfig(vision_config=vision_config, text_config=text_config,
                                      image_token_index=LLAVA_IMAGE_TOKEN, image_seq_length=16, **overrides)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "embedding" in name and "vision" in name:
                p.normal_(0.0, 0.5)
    return model.to(getattr(torch, dtype)).eval()
