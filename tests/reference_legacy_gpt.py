"""Reference transforms for Megatron-LM's legacy (pre-Megatron-Core) GPT checkpoints, written from the
legacy model's own code (megatron/legacy/model/{gpt_model,language_model,transformer}.py and
megatron/training/checkpointing.py), independently of dist_reshard's planner and of legacy_gpt.py.

- ParallelAttention's query_key_value output, per TP rank, is viewed as [ng_r, (np/ng + 2) * hn]: each
  local query group's heads, then its key, then its value.
- ParallelMLP with SwiGLU chunks its local dense_h_to_4h output in two: silu(first) * second.
- dense and dense_4h_to_h are row-parallel (input dim split); the rest of the matrices column-parallel.
- The vocabulary is padded (zero rows here) to a multiple of make_vocab_size_divisible_by x TP.
"""

from __future__ import annotations

import torch


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros((rows - w.shape[0],) + tuple(w.shape[1:]))])


def _qkv_rank(q, k, v, groups: int, tp: int, r: int) -> torch.Tensor:
    """Rank r's query_key_value rows (or bias entries): its query groups, each [q heads; k; v]."""
    per_q, per_kv = q.shape[0] // groups, k.shape[0] // groups
    parts = []
    for g in range(r * groups // tp, (r + 1) * groups // tp):
        parts += [q[g * per_q:(g + 1) * per_q], k[g * per_kv:(g + 1) * per_kv], v[g * per_kv:(g + 1) * per_kv]]
    return torch.cat(parts)


def legacy_gpt_files(hf: dict, config, tp: int, pp: int, divisible_by: int = 128) -> dict:
    """{(tp_rank, pp_rank): the `model` container} of an HF Llama-shaped model as legacy GPT rank files."""
    layers = config.num_hidden_layers
    groups = config.num_key_value_heads
    multiple = divisible_by * tp
    padded = -(-config.vocab_size // multiple) * multiple
    embedding = _pad_rows(hf["model.embed_tokens.weight"], padded)
    files = {}
    for r in range(tp):
        for p in range(pp):
            encoder = {}
            for j in range(layers // pp):
                h = f"model.layers.{p * layers // pp + j}."
                attn, mlp = h + "self_attn.", h + "mlp."
                encoder[f"layers.{j}.input_norm.weight"] = hf[h + "input_layernorm.weight"]
                encoder[f"layers.{j}.self_attention.query_key_value.weight"] = _qkv_rank(
                    hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], groups, tp, r)
                if attn + "q_proj.bias" in hf:
                    encoder[f"layers.{j}.self_attention.query_key_value.bias"] = _qkv_rank(
                        hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], groups, tp, r)
                encoder[f"layers.{j}.self_attention.dense.weight"] = hf[attn + "o_proj.weight"].chunk(tp, 1)[r]
                encoder[f"layers.{j}.post_attention_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
                encoder[f"layers.{j}.mlp.dense_h_to_4h.weight"] = torch.cat(
                    [hf[mlp + "gate_proj.weight"].chunk(tp)[r], hf[mlp + "up_proj.weight"].chunk(tp)[r]])
                encoder[f"layers.{j}.mlp.dense_4h_to_h.weight"] = hf[mlp + "down_proj.weight"].chunk(tp, 1)[r]
            language_model = {}
            if p == 0:
                language_model["embedding"] = {"word_embeddings": {"weight": embedding.chunk(tp)[r]}}
            if p == pp - 1:
                encoder["final_norm.weight"] = hf["model.norm.weight"]
            language_model["encoder"] = encoder
            model = {"language_model": language_model}
            if p == pp - 1 and not config.tie_word_embeddings:
                language_model["output_layer"] = {"weight": _pad_rows(hf["lm_head.weight"], padded).chunk(tp)[r]}
            elif p == pp - 1 and pp > 1:  # the tied head's own copy on the last stage
                model["word_embeddings_for_head"] = {"weight": embedding.chunk(tp)[r]}
            files[(r, p)] = model
    return files


def to_old_qkv_order(t: torch.Tensor, version: float, heads_per_rank: int) -> torch.Tensor:
    """A rank's query_key_value (today's [np, 3, hn] rows, no GQA) in the order checkpoint_version 0
    ([3, np, hn]) or 1.0 ([np, hn, 3]) stored it: the inverse of Megatron-LM's _transpose_first_dim."""
    tail = tuple(t.shape[1:])
    heads = t.view((heads_per_rank, 3, -1) + tail)
    old = heads.transpose(0, 1) if version == 0 else heads.transpose(1, 2)
    return old.contiguous().view(t.shape)
