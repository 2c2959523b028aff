"""The config table (dist_reshard/config/arch_args.py) both ways: every config the families accept, as transformers
writes it, goes to Megatron args and back unchanged, and to an HF config and back unchanged; args Megatron-LM
releases stored under older names read the same; args the families cannot express are refused by name."""

from argparse import Namespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_reshard.base.errors import ConversionError
from dist_reshard.families import family_for
from dist_reshard.config.hf_config import config_from_dict
from dist_reshard.config.hf_export import hf_fields
from dist_reshard.config.layout import TargetLayout
from dist_reshard.config.megatron_args import megatron_args
from dist_reshard.source.megatron_source import _features, config_from_args, differing_facts
from dist_reshard.testing.tiny_models import HYBRID_VARIANTS, OWN_SUITE_VARIANTS, VARIANTS

FAMILIES = sorted(set(VARIANTS) - {"llama2", "llama3", "llama3.2", "moonlight"}) + ["nemotron_h", "mamba2", "nemotron"]


@st.composite
def hf_configs(draw):
    import transformers

    variant = draw(st.sampled_from(FAMILIES))
    config_cls, arch, extra = {**VARIANTS, **HYBRID_VARIANTS, **OWN_SUITE_VARIANTS}[variant]
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    kw = dict(extra, hidden_size=64, intermediate_size=draw(st.sampled_from([96, 128])),
              num_hidden_layers=draw(st.integers(2, 4)), num_attention_heads=heads, num_key_value_heads=groups,
              vocab_size=draw(st.integers(100, 1000)), max_position_embeddings=draw(st.sampled_from([128, 4096])),
              rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6, 3e-6])),
              tie_word_embeddings=draw(st.booleans()))
    if variant not in ("deepseek_v3", "nemotron_h", "mamba2"):
        kw.update(head_dim=head_dim, rope_theta=float(draw(st.sampled_from([10000, 500000, 1000000]))))
    if variant in ("llama3.1",):
        kw.update(attention_bias=draw(st.booleans()),
                  rope_scaling=draw(st.sampled_from([None, dict(rope_type="llama3", factor=draw(
                      st.sampled_from([8.0, 32.0])), low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)])))
    if variant == "mistral":
        kw["sliding_window"] = draw(st.sampled_from([None, 64]))
    if variant in ("mixtral", "qwen2_moe", "qwen3_moe"):
        kw.update(num_experts_per_tok=draw(st.integers(1, 3)))
        kw["num_local_experts" if variant == "mixtral" else "num_experts"] = draw(st.sampled_from([4, 8]))
    if variant in ("qwen2_moe", "qwen3_moe"):
        kw.update(norm_topk_prob=draw(st.booleans()), moe_intermediate_size=draw(st.sampled_from([16, 32])),
                  mlp_only_layers=draw(st.sampled_from([[], [0], [1]])))
    if variant == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=draw(st.sampled_from([32, 48])),
                  decoder_sparse_step=draw(st.sampled_from([1, 2])))
    if variant == "deepseek_v3":
        kw.update(num_key_value_heads=heads, q_lora_rank=draw(st.sampled_from([None, 32])),
                  first_k_dense_replace=draw(st.integers(0, 1)), n_shared_experts=draw(st.integers(0, 2)),
                  rope_scaling=draw(st.sampled_from([None, dict(
                      rope_type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0,
                      original_max_position_embeddings=64)])))
    if variant == "nemotron":
        kw.update(norm_eps=kw.pop("rms_norm_eps"), partial_rotary_factor=draw(st.sampled_from([0.25, 0.5, 1.0])))
    if variant in ("nemotron_h", "mamba2"):
        kw.pop("num_key_value_heads") if variant == "mamba2" else None
        kw.update(layer_norm_epsilon=kw.pop("rms_norm_eps"))
        if variant == "nemotron_h":
            kw.update(hybrid_override_pattern=draw(st.sampled_from(["M*-M-*", "M-M*", "*-"])),
                      num_key_value_heads=groups)
            kw.pop("num_hidden_layers")
    config = getattr(transformers, config_cls)(**kw).to_dict()
    config["architectures"] = [arch]
    return config


def _args(cfg):
    family = family_for(cfg.architecture)
    qk_norm = any("q_layernorm" in r.megatron for r in family.rules) and not cfg.mla
    layout = TargetLayout(tp=1, pp=1, ckpt_format="torch_dist")
    return megatron_args(cfg, layout, 1024, family.name, "fp32", qk_norm)


def _without_stored_config(args):
    """As Megatron-LM itself writes args: no HF config or architecture name of this project's."""
    return Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("hf_") and k != "model_family"})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hf_configs())
def test_every_accepted_config_goes_to_args_and_back_unchanged(config):
    cfg = config_from_dict(config)
    back = config_from_args(_without_stored_config(_args(cfg)), "args")
    assert differing_facts(cfg, back) == []
    assert _features(back.architecture) == _features(cfg.architecture)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hf_configs())
def test_every_accepted_config_goes_to_an_hf_config_and_back_unchanged(config):
    cfg = config_from_dict(config)
    back = config_from_dict(hf_fields(cfg))
    assert differing_facts(cfg, back) == []
    assert back.architecture == cfg.architecture


def _megatron_lm_args(**over):
    """Args as Megatron-LM core_v0.16 stores them for a Llama-shaped run (the fixture's flags)."""
    args = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, kv_channels=16, layernorm_epsilon=1e-5, normalization="RMSNorm", swiglu=True,
                position_embedding_type="rope", rotary_base=500000, add_bias_linear=False, add_qkv_bias=False,
                untie_embeddings_and_output_weights=True, padded_vocab_size=1024, vocab_size=None,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, max_position_embeddings=128)
    args.update(over)
    return Namespace(**{k: v for k, v in args.items() if v is not _DROP})


_DROP = object()


def test_norm_epsilon_under_each_name_megatron_lm_used():
    """core_v0.16 stores --norm-epsilon as layernorm_epsilon, core_v0.12..0.15 as norm_epsilon; absent, it is
    Megatron-LM's default 1e-5 (never the HF default 1e-6)."""
    new = config_from_args(_megatron_lm_args(layernorm_epsilon=3e-6), "args")
    old = config_from_args(_megatron_lm_args(layernorm_epsilon=_DROP, norm_epsilon=3e-6), "args")
    absent = config_from_args(_megatron_lm_args(layernorm_epsilon=_DROP), "args")
    assert (new.norm_epsilon, old.norm_epsilon, absent.norm_epsilon) == (3e-6, 3e-6, 1e-5)
    written = _args(new)
    assert written.layernorm_epsilon == written.norm_epsilon == 3e-6


def test_llama3_rope_scaling_from_megatron_lm_flags():
    cfg = config_from_args(_megatron_lm_args(use_rope_scaling=True, rope_scaling_factor=32.0), "args")
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert hf_fields(cfg)["rope_scaling"] == cfg.rope_scaling


@pytest.mark.parametrize("over,family", [
    (dict(), "LlamaForCausalLM"),
    (dict(add_qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(qk_layernorm=True), "Qwen3ForCausalLM"),
    (dict(num_experts=4, moe_router_topk=2), "MixtralForCausalLM"),
    (dict(num_experts=4, moe_router_topk=2, qk_layernorm=True, moe_router_pre_softmax=True), "Qwen3MoeForCausalLM"),
    (dict(num_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
          moe_layer_freq=[0, 1]), "Qwen2MoeForCausalLM"),
])
def test_the_family_follows_from_the_args(over, family):
    assert config_from_args(_megatron_lm_args(**over), "args").architecture == family


@pytest.mark.parametrize("over,named", [
    (dict(normalization="LayerNorm"), "args.normalization"),
    (dict(swiglu=False), "args.swiglu"),
    (dict(add_bias_linear=True), "args.add_bias_linear"),
    (dict(add_bias_linear=_DROP), "args.add_bias_linear"),  # Megatron-LM's default: biases
    (dict(rotary_percent=0.5), "args.rotary_percent"),
    (dict(rotary_interleaved=True), "args.rotary_interleaved"),
    (dict(position_embedding_type="learned_absolute"), "args.position_embedding_type"),
    (dict(apply_layernorm_1p=True), "args.apply_layernorm_1p"),
    (dict(layernorm_zero_centered_gamma=True), "args.layernorm_zero_centered_gamma"),
    (dict(apply_residual_connection_post_layernorm=True), "args.apply_residual_connection_post_layernorm"),
    (dict(squared_relu=True), "args.squared_relu"),
    (dict(num_experts=4, moe_router_topk=2, moe_router_pre_softmax=True), "args.moe_router_pre_softmax"),
    (dict(num_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1]), "args.moe_layer_freq"),
    (dict(num_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=48), "args.moe_shared_expert_gate"),
    (dict(num_experts=4, moe_router_topk=2, moe_router_score_function="sigmoid"), "args.moe_router_score_function"),
])
def test_args_the_families_cannot_express_are_refused_by_name(over, named):
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        config_from_args(_megatron_lm_args(**over), "args")
