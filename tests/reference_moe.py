"""Reference transforms for MoE models, written from FORMATS.md and Megatron-Core's own state dicts,
independently of the planner: whole HF tensors in, Megatron rank files / torch_dist tensors out."""

from __future__ import annotations

import torch

from reference import LOCAL_NAMES, _vocab, attention, padded_vocab, tp_shard

# HF names of (router, expert prefix, gate, up, down) per family.
EXPERTS = {
    "MixtralForCausalLM": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", "w1", "w3", "w2"),
    "Qwen2MoeForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "Qwen3MoeForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "DeepseekV3ForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "Glm4MoeForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "Glm4MoeLiteForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "DeepseekV2ForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "Ernie4_5_MoeForCausalLM": ("mlp.gate.weight", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
}
MLA_ARCHS = ("DeepseekV3ForCausalLM", "Glm4MoeLiteForCausalLM", "DeepseekV2ForCausalLM")


def num_experts(config) -> int:
    return getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None) or config.num_experts


def is_moe(config, i: int) -> bool:
    if config.architectures[0] == "MixtralForCausalLM":
        return True
    if config.architectures[0] in MLA_ARCHS + ("Glm4MoeForCausalLM",):
        return i >= config.first_k_dense_replace
    if config.architectures[0] == "Ernie4_5_MoeForCausalLM":
        return (config.moe_layer_start_index <= i <= config.moe_layer_end_index
                and (i + 1) % config.moe_layer_interval == 0)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return i not in (getattr(config, "mlp_only_layers", None) or []) and (i + 1) % step == 0


def layer(hf, config, i: int) -> dict[str, object]:
    """TE-named tensors of layer i; routed experts as {"experts.linear_fc1.weight": [per expert]}."""
    p = f"model.layers.{i}."
    out = mla_attention(hf, p) if config.architectures[0] in MLA_ARCHS else attention(
        hf, p, config.num_key_value_heads)
    if not is_moe(config, i):
        out["mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
        out["mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out["mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
        return out
    if config.architectures[0] == "GptOssForCausalLM":
        return dict(out, **gpt_oss_moe(hf, p, num_experts(config)))
    router, prefix, gate, up, down = EXPERTS[config.architectures[0]]
    out["pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
    out["mlp.router.weight"] = hf[p + router]
    E = num_experts(config)
    out["experts.linear_fc1.weight"] = [torch.cat([hf[f"{p}{prefix}.{e}.{gate}.weight"],
                                                   hf[f"{p}{prefix}.{e}.{up}.weight"]]) for e in range(E)]
    out["experts.linear_fc2.weight"] = [hf[f"{p}{prefix}.{e}.{down}.weight"] for e in range(E)]
    if p + "mlp.gate.e_score_correction_bias" in hf:
        out["mlp.router.expert_bias"] = hf[p + "mlp.gate.e_score_correction_bias"]
    if p + "mlp.shared_experts.gate_proj.weight" in hf:  # DeepSeek: ungated
        s = p + "mlp.shared_experts."
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat([hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"]])
        out["mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"]
    if p + "mlp.shared_expert.gate_proj.weight" in hf:
        s = p + "mlp.shared_expert."
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat([hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"]])
        out["mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"]
        out["mlp.shared_experts.gate_weight"] = hf[p + "mlp.shared_expert_gate.weight"]
    return out


def gpt_oss_moe(hf, p: str, E: int) -> dict[str, object]:
    """GPT-OSS: attention's output bias and sinks, the biased router, and experts unfused from HF's `x @ W`
    tensors (gate in even columns, up in odd ones) into Megatron's `W @ x`, gate rows then up rows."""
    a, x = p + "self_attn.", p + "mlp.experts."
    gate_up, gate_up_bias = hf[x + "gate_up_proj"], hf[x + "gate_up_proj_bias"]
    return {
        "self_attention.linear_proj.bias": hf[a + "o_proj.bias"],
        "self_attention.core_attention.softmax_offset": hf[a + "sinks"],
        "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
        "mlp.router.weight": hf[p + "mlp.router.weight"],
        "mlp.router.bias": hf[p + "mlp.router.bias"],
        "experts.linear_fc1.weight": [torch.cat([gate_up[e][:, 0::2].t(), gate_up[e][:, 1::2].t()]).contiguous()
                                      for e in range(E)],
        "experts.linear_fc1.bias": [torch.cat([gate_up_bias[e][0::2], gate_up_bias[e][1::2]]) for e in range(E)],
        "experts.linear_fc2.weight": [hf[x + "down_proj"][e].t().contiguous() for e in range(E)],
        "experts.linear_fc2.bias": [hf[x + "down_proj_bias"][e].clone() for e in range(E)],
    }


def mla_attention(hf, p: str) -> dict[str, torch.Tensor]:
    """Multi-latent attention under Megatron's TE names: one HF tensor each, renamed (FORMATS.md section 8)."""
    a = p + "self_attn."
    out = {"input_layernorm.weight": hf[p + "input_layernorm.weight"],
           "self_attention.linear_kv_down_proj.weight": hf[a + "kv_a_proj_with_mqa.weight"],
           "self_attention.linear_kv_up_proj.layer_norm_weight": hf[a + "kv_a_layernorm.weight"],
           "self_attention.linear_kv_up_proj.weight": hf[a + "kv_b_proj.weight"],
           "self_attention.linear_proj.weight": hf[a + "o_proj.weight"]}
    if a + "q_a_proj.weight" in hf:
        out["self_attention.linear_q_down_proj.weight"] = hf[a + "q_a_proj.weight"]
        out["self_attention.linear_q_up_proj.layer_norm_weight"] = hf[a + "q_a_layernorm.weight"]
        out["self_attention.linear_q_up_proj.weight"] = hf[a + "q_b_proj.weight"]
    else:
        out["self_attention.linear_q_proj.weight"] = hf[a + "q_proj.weight"]
    return out


def legacy_files(hf, config, tp: int, pp: int, ep: int, etp: int | None, impl: str, grouped: bool,
                 stage_sizes: list[int] | None = None):
    """{(tp_rank, pp_rank, ep_rank): {"model": {key: tensor}}}: the dense TP shard in every EP file, and
    EP rank k's experts k*E/ep.. renumbered from 0, split by expert TP rank tp_rank % etp. `stage_sizes`:
    the layers of each pipeline stage of an uneven split (default: equal stages)."""
    etp = etp or tp
    L, E = config.num_hidden_layers, num_experts(config)
    sizes, per_ep = stage_sizes or [L // pp] * pp, E // ep
    vocab = padded_vocab(config.vocab_size, 128, tp)
    files = {}
    for r in range(tp):
        for p in range(pp):
            for k in range(ep):
                sd = {}
                for j in range(sizes[p]):
                    for name, value in layer(hf, config, sum(sizes[:p]) + j).items():
                        if name.startswith("experts."):
                            # linear_fc1 / linear_fc2, weight / bias
                            module, param = name[len("experts."):].rsplit(".", 1)
                            for le in range(per_ep):
                                key = (f"mlp.experts.{module}.{param}{le}" if grouped
                                       else f"mlp.experts.local_experts.{le}.{module}.{param}")
                                sd[f"decoder.layers.{j}.{key}"] = tp_shard(name, value[k * per_ep + le], etp, r % etp)
                        else:
                            local = LOCAL_NAMES.get(name, name) if impl == "local" else name
                            sd[f"decoder.layers.{j}.{local}"] = tp_shard(name, value, tp, r, impl)
                if p == 0:
                    sd["embedding.word_embeddings.weight"] = _vocab(hf["model.embed_tokens.weight"], vocab).chunk(tp)[r]
                if p == pp - 1:
                    sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
                    # Tied: no head of its own, but with PP > 1 the last stage keeps a copy of the embedding.
                    if not config.tie_word_embeddings or pp > 1:
                        head = hf["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
                        sd["output_layer.weight"] = _vocab(head, vocab).chunk(tp)[r]
                files[(r, p, k)] = {"model": sd}
    return files


def torch_dist_tensors(hf, config, tp: int, impl: str = "transformer_engine") -> dict[str, torch.Tensor]:
    """Global tensors as torch_dist stores them: layers on a leading axis when all layers are alike,
    `decoder.layers.{g}.` keys when dense and MoE layers mix; experts on an axis of their own."""
    L = config.num_hidden_layers
    vocab = padded_vocab(config.vocab_size, 128, tp)
    out = {"embedding.word_embeddings.weight": _vocab(hf["model.embed_tokens.weight"], vocab),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = _vocab(hf["lm_head.weight"], vocab)
    layers = [layer(hf, config, i) for i in range(L)]

    mla = config.architectures[0] in MLA_ARCHS

    def key_of(name):
        if name.startswith("experts."):
            return "mlp.experts.experts." + name[len("experts."):]
        if mla and impl == "local":  # no key map in the local MLA spec: its module names are its keys
            return LOCAL_NAMES.get(name, name)
        if name == "pre_mlp_layernorm.weight" and impl == "local":
            return "mlp.linear_fc1.layer_norm_weight"
        return name

    def value_of(v):
        return torch.stack(v) if isinstance(v, list) else v

    stacked = len({is_moe(config, i) for i in range(L)}) == 1
    for i, entry in enumerate(layers):
        for name, v in entry.items():
            if stacked:
                out.setdefault(f"decoder.layers.{key_of(name)}", []).append(value_of(v))
            else:
                out[f"decoder.layers.{i}.{key_of(name)}"] = value_of(v)
    return {k: torch.stack(v) if isinstance(v, list) else v for k, v in out.items()}
