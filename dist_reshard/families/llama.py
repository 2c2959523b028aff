"""Llama 2 / 3 / 3.1 / 3.2 and Mistral: the dense decoder every other dense family extends."""

from ..mapping import Family, Kind, rule

DENSE_DECODER = (
    rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", Kind.VOCAB, layer=False),
    rule("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", Kind.REPLICATED,
         local="input_layernorm.weight"),
    rule("self_attention.linear_qkv.weight",
         ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), Kind.QKV),
    rule("self_attention.linear_qkv.bias",
         ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), Kind.QKV, optional=True),
    rule("self_attention.linear_proj.weight", "self_attn.o_proj.weight", Kind.ROW),
    rule("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight", Kind.REPLICATED,
         local="pre_mlp_layernorm.weight"),
    rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), Kind.GLU),
    rule("mlp.linear_fc2.weight", "mlp.down_proj.weight", Kind.ROW),
    rule("decoder.final_layernorm.weight", "model.norm.weight", Kind.REPLICATED, layer=False),
    rule("output_layer.weight", "lm_head.weight", Kind.VOCAB, layer=False,
         tied_to="embedding.word_embeddings.weight"),
)

LLAMA = Family("llama", ("LlamaForCausalLM",), DENSE_DECODER)
MISTRAL = Family("mistral", ("MistralForCausalLM",), DENSE_DECODER)
