"""Multi-token-prediction (MTP) layers, as DeepSeek-V3 and GLM-4.5 store them after the decoder.

HF layer `model.layers.{num_layers + k}.` holds `enorm`, `hnorm`, `eh_proj`, a decoder layer's tensors,
`shared_head.norm`, and copies of the embedding (`embed_tokens`) and the head (`shared_head.head`).
Megatron-Core's `mtp.layers.{k}.` holds `enorm`, `hnorm`, `eh_proj` (a ColumnParallelLinear: split on dim 0;
both concatenate [enorm(embedding), hnorm(hidden)]), `transformer_layer.*` (the last decoder layer's spec)
and `final_layernorm`; it uses the main model's embedding and output layer. A pipeline stage holding the MTP
block but not the embedding keeps its own copy of the embedding (GPTModel builds one there); torch_dist
stores that copy once, as the embedding. Facts: docs/mtp-facts.md.
"""

from __future__ import annotations

import dataclasses

from .mapping import LAYER, Kind, Rule

MTP = "mtp.layers.{i}."
HF_MTP = "model.layers.{i}."  # `{i}` is the HF layer, num_layers + k (Rule.hf_names)
EMBEDDING = "embedding.word_embeddings.weight"


def _in_transformer_layer(r: Rule) -> Rule:
    """A decoder layer's row as the MTP layer's `transformer_layer` row."""
    inner = MTP + "transformer_layer."

    def moved(name):
        return name.replace(LAYER, inner, 1) if name else name

    te, local = (r.torch_dist_key(impl).replace("decoder.layers.", inner, 1) for impl in ("transformer_engine", "local"))
    return dataclasses.replace(r, megatron=moved(r.megatron), local=moved(r.local), grouped=moved(r.grouped),
                               dist_key=te, local_dist_key=local if local != te else None, mtp=True)


def mtp_rules(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The MTP rows of a family whose table is `rules`."""
    h = lambda c: [(c.hidden_size,)]  # noqa: E731
    return (
        Rule(MTP + "enorm.weight", (HF_MTP + "enorm.weight",), Kind.REPLICATED, mtp=True, shape=h),
        Rule(MTP + "hnorm.weight", (HF_MTP + "hnorm.weight",), Kind.REPLICATED, mtp=True, shape=h),
        Rule(MTP + "eh_proj.weight", (HF_MTP + "eh_proj.weight",), Kind.COLUMN, mtp=True,
             shape=lambda c: [(c.hidden_size, 2 * c.hidden_size)]),
    ) + tuple(_in_transformer_layer(r) for r in rules if r.per_layer and not r.stack) + (
        Rule(MTP + "final_layernorm.weight", (HF_MTP + "shared_head.norm.weight",), Kind.REPLICATED, mtp=True,
             shape=h),
        Rule(MTP + "embed_tokens", (HF_MTP + "embed_tokens.weight",), Kind.VOCAB, mtp=True, shared_with=EMBEDDING),
        Rule(MTP + "shared_head.head", (HF_MTP + "shared_head.head.weight",), Kind.VOCAB, mtp=True,
             shared_with="output_layer.weight"),
        # The MTP stage's own embedding (legacy files only; rank_plan and megatron_source place it).
        Rule(EMBEDDING, ("model.embed_tokens.weight",), Kind.VOCAB, placement="mtp", when="mtp_layers"),
    )


def with_mtp(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    return rules + mtp_rules(rules)
