"""An independent Qwen3-Next / Qwen3.5 -> Megatron-Core transform for checking the converter bit for bit.

Whole tensors with torch ops on the HF state dict (views per head and group, splits, cats), written from
transformers' modeling_qwen3_next.py / modeling_qwen3_5.py and Megatron-Core 0.16.1's gated_delta_net.py / attention.py, never from
the family table: `full_megatron` gives every Megatron tensor whole under its global key; `tp_shard` cuts one the
way Megatron's TP ranks hold it; `torch_dist_tensors` keys them as Megatron's sharded state dict does.
"""

import torch

from reference import padded_vocab

# Whole tensors Megatron stores as row sections split by TP each: key suffix -> section sizes (from the config).
COLUMN = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight", "A_log", "dt_bias")
ROW = ("linear_proj.weight", "linear_fc2.weight", "out_proj.weight")


def _sizes(config):
    nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
    qk, v = nk * config.linear_key_head_dim, nv * config.linear_value_head_dim
    return nk, nv, qk, v


def sections(key: str, config) -> tuple[int, ...] | None:
    _, nv, qk, v = _sizes(config)
    if key.endswith("in_proj.weight"):
        return (qk, qk, v, v, nv, nv)
    if key.endswith("conv1d.weight"):
        return (qk, qk, v)
    if key.endswith("linear_fc1.weight") and "experts.local_experts" not in key:
        f = config.shared_expert_intermediate_size if "shared_experts" in key else config.intermediate_size
        return (f, f)
    return None


def gdn_in_proj(qkvz, ba, config) -> torch.Tensor:
    nk, nv, _, _ = _sizes(config)
    dk, dv, per = config.linear_key_head_dim, config.linear_value_head_dim, nv // nk
    q, k, v, z = qkvz.view(nk, -1, qkvz.shape[1]).split([dk, dk, per * dv, per * dv], dim=1)
    b, a = ba.view(nk, 2 * per, ba.shape[1]).split([per, per], dim=1)
    return torch.cat([t.reshape(-1, qkvz.shape[1]) for t in (q, k, v, z, b, a)])


def gated_qkv(q_proj, k, v, config) -> torch.Tensor:
    nh, ng, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, q_proj.shape[1]
    q, gate = q_proj.view(nh, 2, d, h).unbind(1)
    per = nh // ng
    return torch.cat([q.reshape(ng, per * d, h), gate.reshape(ng, per * d, h), k.view(ng, d, h), v.view(ng, d, h)],
                     dim=1).reshape(-1, h)


def _dense(config, i: int) -> bool:
    """Qwen3.5's config has no experts (dense) or no mlp_only_layers (all MoE)."""
    return not getattr(config, "num_experts", 0) or i in getattr(config, "mlp_only_layers", [])


def full_megatron(hf: dict, config, tp: int) -> dict[str, torch.Tensor]:
    """Every Megatron tensor whole, under `decoder.layers.<global layer>.` and `local_experts.<global expert>.`."""
    pv = padded_vocab(config.vocab_size, 128, tp)

    def pad(w):
        return torch.cat([w, w.new_zeros(pv - w.shape[0], w.shape[1])])

    out = {"embedding.word_embeddings.weight": pad(hf["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf["model.norm.weight"],
           "output_layer.weight": pad(hf["lm_head.weight"])}
    for i, kind in enumerate(config.layer_types):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        if kind == "linear_attention":
            la = p + "linear_attn."
            out[m + "self_attention.in_proj.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
            if la + "in_proj_qkvz.weight" in hf:
                out[m + "self_attention.in_proj.weight"] = gdn_in_proj(hf[la + "in_proj_qkvz.weight"],
                                                                       hf[la + "in_proj_ba.weight"], config)
            else:  # Qwen3.5: [q; k; v], z, b, a flat, as Megatron's sections
                out[m + "self_attention.in_proj.weight"] = torch.cat(
                    [hf[la + f"in_proj_{n}.weight"] for n in ("qkv", "z", "b", "a")])
            for name in ("conv1d.weight", "A_log", "dt_bias", "out_proj.weight"):
                out[m + "self_attention." + name] = hf[la + name]
            # HF scales by the weight, Megatron's zero-centred norm by 1 + weight.
            w = hf[la + "norm.weight"]
            out[m + "self_attention.out_norm.weight"] = (w.float() - 1).to(w.dtype)
        else:
            sa = p + "self_attn."
            out[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
            out[m + "self_attention.linear_qkv.weight"] = gated_qkv(
                hf[sa + "q_proj.weight"], hf[sa + "k_proj.weight"], hf[sa + "v_proj.weight"], config)
            out[m + "self_attention.q_layernorm.weight"] = hf[sa + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf[sa + "k_norm.weight"]
            out[m + "self_attention.linear_proj.weight"] = hf[sa + "o_proj.weight"]
        if _dense(config, i):
            out[m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
            out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
            continue
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
        for e in range(config.num_experts):
            x = f"{p}mlp.experts.{e}."
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat(
                [hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]])
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = hf[x + "down_proj.weight"]
        s = p + "mlp.shared_expert."
        out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([hf[s + "gate_proj.weight"],
                                                                    hf[s + "up_proj.weight"]])
        out[m + "mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"]
        out[m + "mlp.shared_experts.gate_weight"] = hf[p + "mlp.shared_expert_gate.weight"]
    return out


def tp_shard(key: str, full: torch.Tensor, config, tp: int, r: int) -> torch.Tensor:
    """TP rank r's part (routed experts: whole, expert TP 1)."""
    if "local_experts" in key:
        return full
    parts = sections(key, config)
    if parts:
        return torch.cat([s.chunk(tp)[r] for s in full.split(list(parts))])
    if key.endswith(COLUMN):
        return full.chunk(tp)[r]
    if key.endswith(ROW):
        return full.chunk(tp, dim=1)[r]
    return full


def torch_dist_tensors(full: dict, config) -> dict[str, torch.Tensor]:
    """Megatron's DCP keys: every layer `decoder.layers.<g>.`, routed experts stacked on an expert axis under
    `mlp.experts.experts.`, in_proj and conv1d one key per section."""
    out, names = {}, {"in_proj.weight": ("query", "key", "value", "z", "beta", "alpha"),
                      "conv1d.weight": ("query", "key", "value")}
    for key, t in full.items():
        if ".local_experts.0." in key:
            stem, tail = key.split(".local_experts.0.")
            out[f"{stem}.experts.{tail}"] = torch.stack([full[key.replace(".local_experts.0.", f".local_experts.{e}.")]
                                                        for e in range(config.num_experts)])
        elif ".local_experts." in key:
            continue
        elif key.endswith(tuple(names)):
            suffix = next(s for s in names if key.endswith(s))
            for name, part in zip(names[suffix], t.split(list(sections(key, config)))):
                out[f"{key}.{name}"] = part
        else:
            out[key] = t
    return out
