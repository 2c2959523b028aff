"""Reference transform of multi-token-prediction layers, written from Megatron-Core's MultiTokenPredictionLayer
and its state dicts (docs/mtp-facts.md), independently of the planner: whole HF tensors in, the MTP entries of
the MTP stage's rank files / the torch_dist tensors out (added to reference_moe's)."""

from __future__ import annotations

import torch

from reference import LOCAL_NAMES, _vocab, padded_vocab, tp_shard
from reference_moe import MLA_ARCHS, layer, legacy_files, num_experts, torch_dist_tensors


def _own(hf, p: str) -> dict[str, torch.Tensor]:
    """enorm, hnorm, eh_proj ([enorm(embedding), hnorm(hidden)] -> hidden) and the final norm (HF shared_head.norm)."""
    return {"enorm.weight": hf[p + "enorm.weight"], "hnorm.weight": hf[p + "hnorm.weight"],
            "eh_proj.weight": hf[p + "eh_proj.weight"], "final_layernorm.weight": hf[p + "shared_head.norm.weight"]}


def mtp_legacy_files(hf, config, tp: int, pp: int, ep: int, etp: int | None, impl: str,
                     stage_sizes: list[int] | None = None) -> dict:
    """reference_moe.legacy_files plus MTP layer 0 in the last stage's files: its own tensors, its transformer
    layer as a decoder layer's, and (PP > 1) that stage's copy of the embedding."""
    files = legacy_files(hf, config, tp, pp, ep, etp, impl, False, stage_sizes)
    L, E, etp = config.num_hidden_layers, num_experts(config), etp or tp
    per_ep, vocab = E // ep, padded_vocab(config.vocab_size, 128, tp)
    for (r, p, k), containers in files.items():
        if p != pp - 1:
            continue
        sd = containers["model"]
        for name, value in _own(hf, f"model.layers.{L}.").items():
            sd[f"mtp.layers.0.{name}"] = value.chunk(tp)[r] if name == "eh_proj.weight" else value
        inner = "mtp.layers.0.transformer_layer."
        for name, value in layer(hf, config, L).items():
            if name.startswith("experts."):
                module, param = name[len("experts."):].rsplit(".", 1)
                for le in range(per_ep):
                    sd[f"{inner}mlp.experts.local_experts.{le}.{module}.{param}"] = tp_shard(
                        name, value[k * per_ep + le], etp, r % etp)
            else:
                sd[inner + (LOCAL_NAMES.get(name, name) if impl == "local" else name)] = tp_shard(name, value, tp, r, impl)
        if pp > 1:
            sd["embedding.word_embeddings.weight"] = _vocab(hf["model.embed_tokens.weight"], vocab).chunk(tp)[r]
    return files


def mtp_torch_dist_tensors(hf, config, tp: int, impl: str) -> dict[str, torch.Tensor]:
    """reference_moe.torch_dist_tensors plus `mtp.layers.0.*`: keyed by MTP layer, experts on an axis."""
    out = torch_dist_tensors(hf, config, tp, impl)
    L, mla = config.num_hidden_layers, config.architectures[0] in MLA_ARCHS
    for name, value in _own(hf, f"model.layers.{L}.").items():
        out[f"mtp.layers.0.{name}"] = value
    for name, value in layer(hf, config, L).items():
        if name.startswith("experts."):
            key, value = "mlp.experts.experts." + name[len("experts."):], torch.stack(value)
        elif mla and impl == "local":
            key = LOCAL_NAMES.get(name, name)
        elif name == "pre_mlp_layernorm.weight" and impl == "local":
            key = "mlp.linear_fc1.layer_norm_weight"
        else:
            key = name
        out["mtp.layers.0.transformer_layer." + key] = value
    return out


def hf_mtp_logits(main, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each MTP layer's logits [b, s, V] computed by transformers' own MTP modules (modeling_layers.MtpModel:
    enorm, hnorm, eh_proj over [enorm(embedding), hnorm(hidden)], the model's decoder layer class as an MoE layer,
    post_norm = shared_head.norm, the main model's embedding and lm_head), loaded from the HF folder `main` was
    loaded from, independently of the converter and of Megatron-Core.

    Fed as Megatron-Core's MultiTokenPredictionLayer is fed: layer k sees the tokens rolled left by k + 1 with
    token id 0 in the vacated positions (roll_tensor) and the previous hidden states (the main model's after its
    final norm, then each MTP layer's after its own). Positions are HF's (those of the tokens seen, as MtpModel's
    drafting loop passes them); Megatron-Core rotates by the unshifted positions, the same attention up to
    rounding as rotary embeddings depend on position differences only."""
    from transformers.modeling_layers import MtpModel

    L = main.config.num_hidden_layers
    # transformers finds the MTP tensors by the main model's ignore pattern, written for the published depth
    # (model.layers.61 for DeepSeek-V3, 92 / 46 for GLM-4.5): point it at this checkpoint's layer L.
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]
    mtp = MtpModel.from_pretrained(main).eval()
    b, s = tokens.shape
    with torch.no_grad():
        hidden = main.model(tokens).last_hidden_state
        out, ids = [], tokens
        for k in range(len(mtp.layers)):
            ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
            positions = (torch.arange(s) + k + 1)[None].expand(b, s)
            hidden = mtp.forward_layer(k, hidden, positions, None, input_ids=ids)
            out.append(mtp._project_to_logits(hidden).float())
    return out
