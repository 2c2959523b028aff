"""In-memory HF indexes (headers only) of any size: the planner never needs the data."""

from __future__ import annotations

from dist_reshard.hf_config import config_from_dict
from dist_reshard.safetensors_index import DTYPE_SIZES, SourceTensor

LLAMA_405B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16384,
                  intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, torch_dtype="bfloat16")


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
                       p + "self_attn.v_proj.weight": (groups * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
        if qwen2:
            shapes.update({p + "self_attn.q_proj.bias": (heads * d,), p + "self_attn.k_proj.bias": (groups * d,),
                           p + "self_attn.v_proj.bias": (groups * d,)})
        if qwen3:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def synthetic_index(cfg: dict, dtype: str = "BF16", file_bytes: int = 5 << 30) -> dict[str, SourceTensor]:
    """Tensors laid out back to back in files of about `file_bytes`, as save_pretrained shards them."""
    index, file_no, offset = {}, 0, 8
    for name, shape in hf_shapes(cfg).items():
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
