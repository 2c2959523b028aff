"""Llama 2 / 3 / 3.1 / 3.2 and Mistral: the dense decoder every other family extends."""

from .mapping import Family, Kind, rule

EMBEDDING = (
    rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", Kind.VOCAB, layer=False),
)

ATTENTION = (
    rule("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", Kind.REPLICATED,
         local="input_layernorm.weight"),
    rule("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Kind.QKV),
    rule("self_attention.linear_qkv.bias",
         ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), Kind.QKV, optional=True),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Kind.ROW),
)

# Layers with a plain SwiGLU MLP (every layer of a dense model; the `mlp_only_layers` of a MoE one).
DENSE_MLP = (
    rule("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", Kind.REPLICATED,
         local="pre_mlp_layernorm.weight", where="dense"),
    rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Kind.GLU, where="dense"),
    rule("mlp.linear_fc2.weight", "mlp.down_proj.weight", Kind.ROW, where="dense"),
)

FINAL = (
    rule("decoder.final_layernorm.weight", "model.norm.weight", Kind.REPLICATED, layer=False),
    rule("output_layer.weight", "lm_head.weight", Kind.VOCAB, layer=False,
         tied_to="embedding.word_embeddings.weight"),
)

DENSE_DECODER = EMBEDDING + ATTENTION + DENSE_MLP + FINAL

LLAMA = Family("llama", ("LlamaForCausalLM",), DENSE_DECODER)
MISTRAL = Family("mistral", ("MistralForCausalLM",), DENSE_DECODER)
