"""Reference transforms, written from FORMATS.md independently of the planner: full HF tensors in,
the Megatron tensors out. Tests compare the converter's output to these bit for bit."""

from __future__ import annotations

import torch


def _vocab(w: torch.Tensor, padded: int) -> torch.Tensor:
    pad = torch.zeros((padded - w.shape[0],) + tuple(w.shape[1:]), dtype=w.dtype)
    return torch.cat([w, pad])


def padded_vocab(vocab: int, divisible_by: int, tp: int) -> int:
    m = divisible_by * tp
    return (vocab + m - 1) // m * m


def fused_qkv(q, k, v, ng: int) -> torch.Tensor:
    if q.dim() == 1:
        return torch.cat([q.view(ng, -1), k.view(ng, -1), v.view(ng, -1)], dim=1).reshape(-1)
    h = q.shape[1]
    return torch.cat([q.view(ng, -1, h), k.view(ng, -1, h), v.view(ng, -1, h)], dim=1).reshape(-1, h)


def attention(hf: dict[str, torch.Tensor], p: str, ng: int) -> dict[str, torch.Tensor]:
    """One layer's attention tensors (TE names) from the HF layer prefix `p`."""
    out = {
        "self_attention.linear_qkv.layer_norm_weight": hf[p + "input_layernorm.weight"],
        "self_attention.linear_qkv.weight": fused_qkv(*(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), ng),
        "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
    }
    if p + "self_attn.q_proj.bias" in hf:
        out["self_attention.linear_qkv.bias"] = fused_qkv(*(hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"), ng)
    if p + "self_attn.q_norm.weight" in hf:
        out["self_attention.q_layernorm.weight"] = hf[p + "self_attn.q_norm.weight"]
        out["self_attention.k_layernorm.weight"] = hf[p + "self_attn.k_norm.weight"]
    return out


def full_megatron(hf: dict[str, torch.Tensor], config, tp: int, divisible_by: int = 128) -> dict[str, object]:
    """Global (unsharded, padded) Megatron tensors with TE names; per-layer entries are lists by layer."""
    ng = config.num_key_value_heads
    padded = padded_vocab(config.vocab_size, divisible_by, tp)
    out: dict[str, object] = {"embedding.word_embeddings.weight": _vocab(hf["model.embed_tokens.weight"], padded),
                              "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = _vocab(hf["lm_head.weight"], padded)
    layers: dict[str, list] = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        entry = dict(attention(hf, p, ng), **{
            "mlp.linear_fc1.layer_norm_weight": hf[p + "post_attention_layernorm.weight"],
            "mlp.linear_fc1.weight": torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]),
            "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"],
        })
        for k, v in entry.items():
            layers.setdefault(k, []).append(v)
    out.update({f"decoder.layers.{k}": v for k, v in layers.items()})
    return out


COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight",
          "linear_q_proj.weight", "linear_q_up_proj.weight", "linear_kv_up_proj.weight",
          "core_attention.softmax_offset")
ROW = ("linear_proj.weight", "linear_fc2.weight")
# MLA down projections: whole on every rank in the TE spec (duplicated), column-split in the local spec.
LOCAL_COLUMN = ("linear_q_down_proj.weight", "linear_kv_down_proj.weight")
LOCAL_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
               "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
               "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight"}


def tp_shard(key: str, full: torch.Tensor, tp: int, r: int, impl: str = "transformer_engine") -> torch.Tensor:
    if key.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if key.endswith(COLUMN) or (impl == "local" and key.endswith(LOCAL_COLUMN)):
        return full.chunk(tp)[r]
    if key.endswith(ROW):
        return full.chunk(tp, dim=1)[r]
    return full


def legacy_files(hf, config, tp: int, pp: int, vpp: int | None, impl: str, divisible_by: int = 128,
                 chunk_sizes: list[list[int]] | None = None):
    """{(tp_rank, pp_rank): {container: {key: tensor}}} as Megatron's legacy rank files hold them.

    `chunk_sizes[p][v]`: the layers of each model chunk of an uneven split (default: equal chunks); layers
    are numbered chunk by chunk, virtual chunk first, then pipeline rank."""
    full = full_megatron(hf, config, tp, divisible_by)
    L = config.num_hidden_layers
    chunks = vpp or 1
    sizes = chunk_sizes or [[L // (pp * chunks)] * chunks for _ in range(pp)]
    starts, n = {}, 0
    for v in range(chunks):
        for p in range(pp):
            starts[p, v], n = n, n + sizes[p][v]
    files = {}
    for r in range(tp):
        for p in range(pp):
            containers = {}
            for v in range(chunks):
                sd = {}
                first_layer, per = starts[p, v], sizes[p][v]
                for key, value in full.items():
                    if not key.startswith("decoder.layers."):
                        continue
                    name = key[len("decoder.layers."):]
                    if impl == "local":
                        name = LOCAL_NAMES.get(name, name)
                    for j in range(per):
                        sd[f"decoder.layers.{j}.{name}"] = tp_shard(key, value[first_layer + j], tp, r)
                if p == 0 and v == 0:
                    sd["embedding.word_embeddings.weight"] = tp_shard("word_embeddings.weight",
                                                                      full["embedding.word_embeddings.weight"], tp, r)
                if p == pp - 1 and v == chunks - 1:
                    sd["decoder.final_layernorm.weight"] = full["decoder.final_layernorm.weight"]
                    if not config.tie_word_embeddings:
                        sd["output_layer.weight"] = tp_shard("output_layer.weight", full["output_layer.weight"], tp, r)
                    elif pp > 1:
                        sd["output_layer.weight"] = tp_shard("output_layer.weight",
                                                             full["embedding.word_embeddings.weight"], tp, r)
                containers[f"model{v}" if vpp else "model"] = sd
            files[(r, p)] = containers
    return files


def torch_dist_tensors(hf, config, tp: int, divisible_by: int = 128) -> dict[str, torch.Tensor]:
    """Global tensors as torch_dist stores them (layers stacked on a leading axis)."""
    out = {}
    for key, value in full_megatron(hf, config, tp, divisible_by).items():
        out[key] = torch.stack(value) if isinstance(value, list) else value
    return out
