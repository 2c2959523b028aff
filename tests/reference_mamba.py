"""Reference transform for Mamba hybrids, written from the facts (Megatron-Core's mamba_mixer.py and
mamba_block.py, transformers' Nemotron-H / Mamba-2), independently of the planner: full HF tensors in,
Megatron's MambaModel tensors out (TE-spec names), per legacy rank file or as torch_dist global tensors.

- Layer i of the pattern: `M` mamba, `*` attention, `-` MLP; its HF `norm` is the fused layer_norm_weight of
  the mixer's first linear (in_proj, linear_qkv, linear_fc1).
- in_proj rows are [z | x | B | C | dt] (d_inner, d_inner, groups*state, groups*state, heads); TP rank r
  holds the r-th 1/TP of each section, concatenated in that order. conv1d channels: [x | B | C] likewise.
  A_log, D, dt_bias (heads) and the gated norm (d_inner) are split in TP chunks; out_proj by columns.
- torch_dist: every layer keyed `decoder.layers.{g}.`; in_proj and conv1d stored per section under
  `<name>.z`, `.x`, `.B`, `.C`, `.dt`, each its whole section.
"""

from __future__ import annotations

import torch

from reference import _vocab, fused_qkv, padded_vocab


def pattern(config) -> str:
    if config.model_type == "mamba2":
        return "M" * config.num_hidden_layers
    return config.hybrid_override_pattern


def _dims(config):
    if config.model_type == "mamba2":
        heads, head_dim, state = config.num_heads, config.head_dim, config.state_size
    else:
        heads, head_dim, state = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size
    d_inner = heads * head_dim
    gs = config.n_groups * state
    return dict(in_proj=[d_inner, d_inner, gs, gs, heads], conv=[d_inner, gs, gs])


def _layer(hf, i: int, kind: str, config) -> dict[str, torch.Tensor]:
    p = f"backbone.layers.{i}."
    if kind == "M":
        names = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight",
                 "out_proj.weight"]
        out = {f"mixer.{n}": hf[p + "mixer." + n] for n in names}
        out["mixer.in_proj.layer_norm_weight"] = hf[p + "norm.weight"]
        return out
    if kind == "*":
        q, k, v = (hf[p + f"mixer.{x}_proj.weight"] for x in "qkv")
        return {"self_attention.linear_qkv.layer_norm_weight": hf[p + "norm.weight"],
                "self_attention.linear_qkv.weight": fused_qkv(q, k, v, config.num_key_value_heads),
                "self_attention.linear_proj.weight": hf[p + "mixer.o_proj.weight"]}
    assert kind == "-", kind
    return {"mlp.linear_fc1.layer_norm_weight": hf[p + "norm.weight"],
            "mlp.linear_fc1.weight": hf[p + "mixer.up_proj.weight"],
            "mlp.linear_fc2.weight": hf[p + "mixer.down_proj.weight"]}


def _sections(name: str, config):
    if name.endswith("in_proj.weight"):
        return _dims(config)["in_proj"], ["z", "x", "B", "C", "dt"]
    if name.endswith(("conv1d.weight", "conv1d.bias")):
        return _dims(config)["conv"], ["x", "B", "C"]
    return None, None


def _shard(name: str, full: torch.Tensor, config, tp: int, r: int) -> torch.Tensor:
    sizes, _ = _sections(name, config)
    if sizes:
        return torch.cat([part.chunk(tp)[r] for part in full.split(sizes)])
    if name.endswith(("layer_norm_weight", "final_norm.weight")):
        return full
    if name.endswith(("out_proj.weight", "linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[r]
    return full.chunk(tp)[r]  # column-parallel: qkv, fc1, A_log, D, dt_bias, gated norm, embedding, output


def _globals(hf, config, tp: int):
    vocab = padded_vocab(config.vocab_size, 128, tp)
    first = {"embedding.word_embeddings.weight": _vocab(hf["backbone.embeddings.weight"], vocab)}
    layers = [_layer(hf, i, kind, config) for i, kind in enumerate(pattern(config))]
    last = {"decoder.final_norm.weight": hf["backbone.norm_f.weight"],
            "output_layer.weight": _vocab(hf["lm_head.weight"], vocab)}
    return first, layers, last


def legacy_files(hf, config, tp: int, pp: int, first_stage: int | None = None
                 ) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """{(tp_rank, pp_rank): the `model` tensors of that rank file}; layers split evenly over the stages, or
    `first_stage` layers on the first and the rest evenly over the others (--decoder-first-pipeline-num-layers)."""
    first, layers, last = _globals(hf, config, tp)
    if first_stage is None:
        counts = [len(layers) // pp] * pp
    else:
        counts = [first_stage] + [(len(layers) - first_stage) // (pp - 1)] * (pp - 1)
    out = {}
    for r in range(tp):
        for p in range(pp):
            sd = {}
            if p == 0:
                sd.update({k: _shard(k, v, config, tp, r) for k, v in first.items()})
            for j in range(counts[p]):
                for k, v in layers[sum(counts[:p]) + j].items():
                    sd[f"decoder.layers.{j}.{k}"] = _shard(k, v, config, tp, r)
            if p == pp - 1:
                sd.update({k: _shard(k, v, config, tp, r) for k, v in last.items()})
            out[(r, p)] = sd
    return out


def torch_dist_tensors(hf, config, tp: int) -> dict[str, torch.Tensor]:
    """Global tensors under MambaModel's torch_dist keys."""
    first, layers, last = _globals(hf, config, tp)
    out = dict(first)
    out.update(last)
    for g, layer in enumerate(layers):
        for k, v in layer.items():
            sizes, names = _sections(k, config)
            if sizes:
                out.update({f"decoder.layers.{g}.{k}.{n}": part for n, part in zip(names, v.split(sizes))})
            else:
                out[f"decoder.layers.{g}.{k}"] = v
    return out


# A GPT model laid out as a MambaModel (Megatron-LM's gpt_mamba_conversion.py): GPT layer i's attention tensors
# go to the i-th `*` layer, its MLP tensors to the i-th `-` layer; the final norm is MambaStack's `final_norm`.

def _gpt_layers(hf, config, tp: int, pattern: str):
    from reference import full_megatron

    full = full_megatron(hf, config, tp)
    seen = {"*": 0, "-": 0}
    layers = []
    for kind in pattern:
        prefix = "decoder.layers." + ("self_attention." if kind == "*" else "mlp.")
        layers.append({k[len("decoder.layers."):]: v[seen[kind]] for k, v in full.items() if k.startswith(prefix)})
        seen[kind] += 1
    first = {"embedding.word_embeddings.weight": full["embedding.word_embeddings.weight"]}
    last = {"decoder.final_norm.weight": full["decoder.final_layernorm.weight"],
            "output_layer.weight": full["output_layer.weight"]}
    return first, layers, last


def gpt_as_hybrid_files(hf, config, tp: int, pp: int, pattern: str) -> dict[tuple[int, int], dict]:
    from reference import tp_shard

    first, layers, last = _gpt_layers(hf, config, tp, pattern)
    per = len(layers) // pp
    out = {}
    for r in range(tp):
        for p in range(pp):
            sd = {k: tp_shard(k, v, tp, r) for k, v in first.items()} if p == 0 else {}
            for j in range(per):
                sd.update({f"decoder.layers.{j}.{k}": tp_shard(k, v, tp, r) for k, v in layers[p * per + j].items()})
            if p == pp - 1:
                sd.update({k: tp_shard(k, v, tp, r) for k, v in last.items()})
            out[(r, p)] = sd
    return out


def gpt_as_hybrid_torch_dist(hf, config, tp: int, pattern: str) -> dict[str, torch.Tensor]:
    first, layers, last = _gpt_layers(hf, config, tp, pattern)
    out = dict(first, **last)
    for g, layer in enumerate(layers):
        out.update({f"decoder.layers.{g}.{k}": v for k, v in layer.items()})
    return out
