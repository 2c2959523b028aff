"""In-memory HF indexes (headers only) of any size: the planner never needs the data."""

from __future__ import annotations

from dist_reshard.config.hf_config import config_from_dict
from dist_reshard.formats.safetensors_index import DTYPE_SIZES, SourceTensor

LLAMA_405B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16384,
                  intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, torch_dtype="bfloat16")

MIXTRAL_8X22B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=6144,
                     intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                     vocab_size=32768, num_local_experts=8, num_experts_per_tok=2, torch_dtype="bfloat16")
QWEN3_235B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=4096,
                  intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                  num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                  decoder_sparse_step=1, mlp_only_layers=[], torch_dtype="bfloat16")
_EXPERT_NAMES = {"MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
                 "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj")}


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"
    qwen3 = cfg["architectures"][0] == "Qwen3ForCausalLM"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (groups * d, h),
                       p + "self_attn.v_proj.weight": (groups * d, h), p + "self_attn.o_proj.weight": (h, heads * d)})
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        if experts:
            block, gate, up, down = _EXPERT_NAMES[cfg["architectures"][0]]
            fe = cfg.get("moe_intermediate_size") or f
            shapes[f"{p}{block}.gate.weight"] = (experts, h)
            for e in range(experts):
                q = f"{p}{block}.experts.{e}."
                shapes.update({q + gate + ".weight": (fe, h), q + up + ".weight": (fe, h), q + down + ".weight": (h, fe)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
        if qwen2:
            shapes.update({p + "self_attn.q_proj.bias": (heads * d,), p + "self_attn.k_proj.bias": (groups * d,),
                           p + "self_attn.v_proj.bias": (groups * d,)})
        if qwen3 or cfg["architectures"][0] == "Qwen3MoeForCausalLM":
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def synthetic_index(cfg: dict, dtype: str = "BF16", file_bytes: int = 5 << 30) -> dict[str, SourceTensor]:
    return lay_out({name: (shape, dtype) for name, shape in hf_shapes(cfg).items()}, file_bytes)


def lay_out(tensors: dict[str, tuple[tuple[int, ...], str]], file_bytes: int) -> dict[str, SourceTensor]:
    """Tensors laid out back to back in files of about `file_bytes`, as save_pretrained shards them."""
    index, file_no, offset = {}, 0, 8
    for name, (shape, dtype) in tensors.items():
        n = DTYPE_SIZES[dtype]
        for s in shape:
            n *= s
        if offset > 8 and offset + n > file_bytes:
            file_no, offset = file_no + 1, 8
        index[name] = SourceTensor(name, f"model-{file_no:05d}.safetensors", dtype, shape, offset, n)
        offset += n
    return index


def synthetic(cfg: dict, dtype: str = "BF16"):
    return config_from_dict(cfg), synthetic_index(cfg, dtype)


# DeepSeek-V3 as published: 61 layers (3 dense), MLA, 256 routed experts + 1 shared, FP8 weights with 128 x 128
# block scales (router, norms, embeddings and head stay bf16; the routing bias is float32), and one
# multi-token-prediction layer stored as layer 61.
DEEPSEEK_V3_671B = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168,
                        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
                        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
                        max_position_embeddings=163840, rms_norm_eps=1e-6, torch_dtype="bfloat16",
                        num_nextn_predict_layers=1,
                        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]})


# Megatron-Core layout strings for its 61 layers and the MTP layer at PP16: DeepSeek's own VPP2 layout (the
# example of Megatron-Core 0.16.1's PipelineParallelLayerLayout.pretty_repr: the MTP layer alone in pipeline
# rank 14's second virtual stage, the loss alone in rank 15's), and one without VPP, the MTP layer beside the loss.
DEEPSEEK_VPP2_LAYOUT = "Et*3|(tt|)*29,m|L"
DEEPSEEK_PP16_LAYOUT = "Et*3|(t*4|)*14,ttmL"


def deepseek_v3_shapes(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype) of a DeepSeek-V3 checkpoint, FP8 weights with their scale tensors."""
    h, v, heads = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qd = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    fp8 = "quantization_config" in cfg
    out = {"model.embed_tokens.weight": ((v, h), "BF16"), "model.norm.weight": ((h,), "BF16"),
           "lm_head.weight": ((v, h), "BF16")}

    def linear(name, rows, cols):
        if not fp8:
            out[name] = ((rows, cols), "BF16")
            return
        out[name] = ((rows, cols), "F8_E4M3")
        out[name + "_scale_inv"] = ((-(-rows // 128), -(-cols // 128)), "F32")

    layers = cfg["num_hidden_layers"]
    for i in range(layers + cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}."
        if i >= layers:  # an MTP layer: its own norms and projection (bf16, as eh_proj is published), its
            # copies of the embedding and head, then a decoder layer's tensors (an MoE layer, FP8)
            out.update({p + "enorm.weight": ((h,), "BF16"), p + "hnorm.weight": ((h,), "BF16"),
                        p + "eh_proj.weight": ((h, 2 * h), "BF16"), p + "embed_tokens.weight": ((v, h), "BF16"),
                        p + "shared_head.norm.weight": ((h,), "BF16"), p + "shared_head.head.weight": ((v, h), "BF16")})
        out[p + "input_layernorm.weight"] = ((h,), "BF16")
        out[p + "post_attention_layernorm.weight"] = ((h,), "BF16")
        linear(p + "self_attn.q_a_proj.weight", cfg["q_lora_rank"], h)
        out[p + "self_attn.q_a_layernorm.weight"] = ((cfg["q_lora_rank"],), "BF16")
        linear(p + "self_attn.q_b_proj.weight", heads * qd, cfg["q_lora_rank"])
        linear(p + "self_attn.kv_a_proj_with_mqa.weight", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h)
        out[p + "self_attn.kv_a_layernorm.weight"] = ((cfg["kv_lora_rank"],), "BF16")
        linear(p + "self_attn.kv_b_proj.weight", heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]),
               cfg["kv_lora_rank"])
        linear(p + "self_attn.o_proj.weight", h, heads * cfg["v_head_dim"])
        if i < cfg["first_k_dense_replace"]:
            f = cfg["intermediate_size"]
            linear(p + "mlp.gate_proj.weight", f, h)
            linear(p + "mlp.up_proj.weight", f, h)
            linear(p + "mlp.down_proj.weight", h, f)
            continue
        f, experts = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
        out[p + "mlp.gate.weight"] = ((experts, h), "BF16")
        out[p + "mlp.gate.e_score_correction_bias"] = ((experts,), "F32")
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            linear(q + "gate_proj.weight", f, h)
            linear(q + "up_proj.weight", f, h)
            linear(q + "down_proj.weight", h, f)
        sf = f * cfg["n_shared_experts"]
        linear(p + "mlp.shared_experts.gate_proj.weight", sf, h)
        linear(p + "mlp.shared_experts.up_proj.weight", sf, h)
        linear(p + "mlp.shared_experts.down_proj.weight", h, sf)
    return out


def deepseek_v3(cfg: dict = DEEPSEEK_V3_671B, file_bytes: int = 4 << 30, mtp: bool = True):
    """(ModelConfig, index as the converter sees it: FP8 weights decoded to bf16) of a headers-only model; its
    MTP layers kept (counted as `open_hf_folder` counts them) or, `mtp` False, dropped as --drop-mtp drops them."""
    import dataclasses

    from dist_reshard.source.block_fp8 import dequantized_index
    from dist_reshard.source.hf_source import mtp_tensors

    index = lay_out(deepseek_v3_shapes(cfg), file_bytes)
    config = config_from_dict(cfg)
    index = dequantized_index(index, config)
    stored_mtp = mtp_tensors(index, config)
    if not mtp:
        return config, {n: t for n, t in index.items() if n not in stored_mtp}
    layers = {int(n.split(".")[2]) for n in stored_mtp}
    return dataclasses.replace(config, mtp_layers=len(layers)), index
