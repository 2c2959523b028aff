"""Phi-3 (`Phi3ForCausalLM`): one 2-rank torchrun job converts a tiny seeded model (q, k, v fused in `qkv_proj`,
gate and up in `gate_up_proj`) to legacy TP2 and torch_dist TP2, loads each into real Megatron-Core on CPU with
the HF logits, and converts each back to the HF folder's bytes; the files equal the reference transform (the
fused HF tensors cut by plain slicing, then tests/reference.py's Llama transform) bit for bit. LongRoPE and
partial rotary are refused by name before anything is written."""

import pytest

from conftest import assert_same_hf, edited_copy, load_hf_config, load_hf_state, mcore_check, plan_hf
from dist_reshard.testing.tiny_models import build_model, save_model
from test_convert_exact import check_legacy, check_torch_dist


def unfused(hf: dict, config) -> dict:
    """The HF state with Phi-3's fused tensors cut into Llama's q/k/v and gate/up tensors."""
    d = config.hidden_size // config.num_attention_heads
    q, kv, f = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    out = {}
    for name, t in hf.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            p = name[:-len("qkv_proj.weight")]
            out.update({p + "q_proj.weight": t[:q], p + "k_proj.weight": t[q:q + kv],
                        p + "v_proj.weight": t[q + kv:q + 2 * kv]})
            assert t.shape[0] == q + 2 * kv
        elif name.endswith("mlp.gate_up_proj.weight"):
            p = name[:-len("gate_up_proj.weight")]
            out.update({p + "gate_proj.weight": t[:f], p + "up_proj.weight": t[f:]})
            assert t.shape[0] == 2 * f
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_model(build_model("phi3", seed=63), str(tmp_path_factory.mktemp("hf") / "phi3"))


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3_out")
    cases = [dict(tp=2, pp=1, load=model, save=str(root / fmt), format=fmt, impl="local", name=fmt,
                  back=str(root / f"{fmt}-back")) for fmt in ("torch", "torch_dist")]
    back = [dict(dst="hf", load=c["save"], save=c["back"]) for c in cases]
    return {r["name"]: r for r in mcore_check(2, cases + back, root)}


def test_phi3_megatron_logits_match_hf(converted):
    for fmt, result in converted.items():
        assert result["rel_diff"] <= 1e-4, (fmt, result["rel_diff"])


def test_phi3_files_equal_reference(converted, model, tmp_path):
    hf = unfused(load_hf_state(model), load_hf_config(model))
    check_legacy(converted["torch"], hf)
    check_torch_dist(converted["torch_dist"], tmp_path, hf)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_phi3_way_back_is_byte_identical(converted, model, fmt):
    assert_same_hf(model, converted[fmt]["back"])


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling=dict(type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4),
          original_max_position_embeddings=64), "rope_scaling type 'longrope'"),
    (dict(rope_scaling=dict(type="su", short_factor=[1.0] * 4, long_factor=[2.0] * 4)), "rope_scaling type 'su'"),
    (dict(partial_rotary_factor=0.75), "partial_rotary_factor = 0.75: not supported for Phi-3"),
])
def test_phi3_longrope_and_partial_rotary_are_refused(model, tmp_path, changes, message):
    from dist_reshard.base.errors import ConversionError

    folder = edited_copy(model, tmp_path / "hf", drop=("rope_parameters",), **dict(dict(rope_theta=10000.0), **changes))
    with pytest.raises(ConversionError, match=message):
        plan_hf(folder)
