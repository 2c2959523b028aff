"""Nemotron-4 / Minitron (`NemotronForCausalLM`): one 4-rank torchrun job converts a tiny seeded model (LayerNorms
with a bias scaling by 1 + weight, squared-ReLU MLP without a gate, rotary on half of each head) to legacy
TP2 x PP2 and torch_dist TP2 (local spec), loads each into real Megatron-Core on CPU with the HF logits, converts
each back to the HF folder's bytes, and writes legacy TP2 under TE-spec names (not loaded: the CPU harness builds
the local spec). The files equal an independent reference transform bit for bit. Variants Megatron-Core cannot
express (or this table does not) are refused by name before anything is written."""

import os
from argparse import Namespace

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import assert_same_hf, edited_copy, load_hf_config, load_hf_state, mcore_check, plan_hf
from dist_reshard.testing.tiny_models import build_model, save_model
from reference import fused_qkv, padded_vocab


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_model(build_model("nemotron", seed=74), str(tmp_path_factory.mktemp("hf") / "nemotron"))


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("nemotron_out")
    cases = [dict(tp=2, pp=2 if fmt == "torch" else 1, load=model, save=str(root / fmt), format=fmt, impl="local",
                  name=fmt, back=str(root / f"{fmt}-back")) for fmt in ("torch", "torch_dist")]
    te = dict(tp=2, pp=1, load=model, save=str(root / "torch-te"), format="torch", impl="transformer_engine",
              name="torch-te", mcore_load=False)
    back = [dict(dst="hf", load=c["save"], save=c["back"]) for c in cases]
    results = {r["name"]: r for r in mcore_check(4, cases + [te] + back, root)}
    return dict(results, **{"torch-te": te})


# --- The reference: Megatron's tensors from the full HF ones, by plain slicing (FORMATS.md sections 2, 3, 5). ---

LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
         "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
         "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
         "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}


def reference_layers(hf: dict, config) -> list[dict]:
    """Each layer's full Megatron tensors (TE names): the stored norm weights are HF's as they are (both sides
    scale by 1 + weight), fc1 is up_proj alone."""
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append({
            "self_attention.linear_qkv.layer_norm_weight": hf[p + "input_layernorm.weight"],
            "self_attention.linear_qkv.layer_norm_bias": hf[p + "input_layernorm.bias"],
            "self_attention.linear_qkv.weight": fused_qkv(*(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"),
                                                          config.num_key_value_heads),
            "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
            "mlp.linear_fc1.layer_norm_weight": hf[p + "post_attention_layernorm.weight"],
            "mlp.linear_fc1.layer_norm_bias": hf[p + "post_attention_layernorm.bias"],
            "mlp.linear_fc1.weight": hf[p + "mlp.up_proj.weight"],
            "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"],
        })
    return layers


def shard(name: str, full: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    if name.endswith(("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")):
        return full.chunk(tp)[r]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[r]
    return full


def padded(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, torch.zeros(rows - w.shape[0], w.shape[1], dtype=w.dtype)])


def reference_legacy(hf: dict, config, tp: int, pp: int, impl: str) -> dict:
    """{(tp_rank, pp_rank): state dict} of the legacy rank files."""
    layers, rows = reference_layers(hf, config), padded_vocab(config.vocab_size, 128, tp)
    per = config.num_hidden_layers // pp
    files = {}
    for r in range(tp):
        for p in range(pp):
            sd = {}
            for j in range(per):
                for name, t in layers[p * per + j].items():
                    sd[f"decoder.layers.{j}.{LOCAL.get(name, name) if impl == 'local' else name}"] = shard(name, t, tp, r)
            if p == 0:
                sd["embedding.word_embeddings.weight"] = padded(hf["model.embed_tokens.weight"], rows).chunk(tp)[r]
            if p == pp - 1:
                sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
                sd["decoder.final_layernorm.bias"] = hf["model.norm.bias"]
                sd["output_layer.weight"] = padded(hf["lm_head.weight"], rows).chunk(tp)[r]
            files[r, p] = sd
    return files


def reference_torch_dist(hf: dict, config, tp: int) -> dict:
    """The global tensors under their DCP keys (layers stacked on a leading axis, TE names)."""
    layers, rows = reference_layers(hf, config), padded_vocab(config.vocab_size, 128, tp)
    out = {f"decoder.layers.{name}": torch.stack([layer[name] for layer in layers]) for name in layers[0]}
    out.update({"embedding.word_embeddings.weight": padded(hf["model.embed_tokens.weight"], rows),
                "output_layer.weight": padded(hf["lm_head.weight"], rows),
                "decoder.final_layernorm.weight": hf["model.norm.weight"],
                "decoder.final_layernorm.bias": hf["model.norm.bias"]})
    return out


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), what


# --- The tests. ---

def test_nemotron_megatron_logits_match_hf(converted):
    for fmt in ("torch", "torch_dist"):
        assert converted[fmt]["rel_diff"] <= 1e-4, (fmt, converted[fmt]["rel_diff"])


@pytest.mark.parametrize("name", ["torch", "torch-te"])
def test_nemotron_legacy_files_equal_reference(converted, model, name):
    case = converted[name]
    expected = reference_legacy(load_hf_state(model), load_hf_config(model), case["tp"], case["pp"], case["impl"])
    root = os.path.join(case["save"], "iter_0000001")
    for (r, p), tensors in expected.items():
        file = f"mp_rank_{r:02d}" + (f"_{p:03d}" if case["pp"] > 1 else "")
        sd = torch.load(os.path.join(root, file, "model_optim_rng.pt"), weights_only=False)
        got = {k: v for k, v in sd["model"].items() if not k.endswith("._extra_state")}
        assert sorted(got) == sorted(tensors), file
        for k, v in tensors.items():
            assert_bitwise(got[k], v, f"{file}/{k}")
    assert len(os.listdir(root)) == len(expected)


def test_nemotron_torch_dist_equals_reference(converted, model, tmp_path):
    case = converted["torch_dist"]
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(case["save"], "iter_0000001"), flat)
    got = {k: v for k, v in torch.load(flat, weights_only=False).items() if isinstance(v, torch.Tensor)}
    expected = reference_torch_dist(load_hf_state(model), load_hf_config(model), case["tp"])
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert_bitwise(got[k], v, k)


def test_nemotron_args_are_megatron_lms_flags(converted):
    args = torch.load(os.path.join(converted["torch"]["save"], "iter_0000001", "mp_rank_00_000",
                                   "model_optim_rng.pt"), weights_only=False)["args"]
    assert (args.normalization, args.apply_layernorm_1p, args.squared_relu, args.swiglu) == (
        "LayerNorm", True, True, False)
    assert (args.rotary_percent, args.add_bias_linear, args.add_qkv_bias, args.layernorm_epsilon) == (
        0.5, False, False, 1e-5)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_nemotron_way_back_is_byte_identical(converted, model, fmt):
    assert_same_hf(model, converted[fmt]["back"])


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_act="gelu"), "hidden_act = 'gelu': only relu2"),
    (dict(attention_bias=True), "attention_bias = true: not supported for Nemotron-4"),
    (dict(mlp_bias=True), "mlp_bias = true: not supported for Nemotron-4"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0, partial_rotary_factor=0.5)),
     "rope_scaling .*'linear'.*not supported for Nemotron-4"),
])
def test_nemotron_variants_megatron_cannot_express_are_refused(model, tmp_path, changes, message):
    from dist_reshard.base.errors import ConversionError

    folder = edited_copy(model, tmp_path / "hf", **changes)
    with pytest.raises(ConversionError, match=message):
        plan_hf(folder)


def _nemotron_args(**over) -> Namespace:
    """Args as Megatron-LM stores them for a Nemotron-4 run (`--normalization LayerNorm --apply-layernorm-1p
    --squared-relu --rotary-percent 0.5 --disable-bias-linear --position-embedding-type rope`)."""
    args = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, kv_channels=16, layernorm_epsilon=1e-5, normalization="LayerNorm",
                apply_layernorm_1p=True, squared_relu=True, swiglu=False, rotary_percent=0.5,
                position_embedding_type="rope", rotary_base=10000, add_bias_linear=False, add_qkv_bias=False,
                untie_embeddings_and_output_weights=True, padded_vocab_size=1024, vocab_size=None,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, max_position_embeddings=4096)
    args.update(over)
    return Namespace(**args)


def test_nemotron_from_megatron_lm_args():
    from dist_reshard.config.hf_config import config_from_dict
    from dist_reshard.config.hf_export import hf_fields
    from dist_reshard.source.megatron_source import config_from_args, differing_facts

    cfg = config_from_args(_nemotron_args(), "args")
    assert (cfg.architecture, cfg.normalization, cfg.layernorm_zero_centered_gamma, cfg.squared_relu,
            cfg.rotary_percent) == ("NemotronForCausalLM", "LayerNorm", True, True, 0.5)
    fields = hf_fields(cfg)
    assert (fields["model_type"], fields["hidden_act"], fields["norm_eps"], fields["partial_rotary_factor"]) == (
        "nemotron", "relu2", 1e-5, 0.5)
    assert differing_facts(config_from_dict(fields), cfg) == []


@pytest.mark.parametrize("over, named", [
    (dict(qk_layernorm=True), "args.qk_layernorm = True with LayerNorm"),
    (dict(num_experts=4, moe_router_topk=2), "args.normalization = 'LayerNorm' with num_experts"),
    (dict(apply_layernorm_1p=False), "args.normalization"),  # plain LayerNorm: no HF family
    (dict(squared_relu=False, swiglu=True), "args.normalization"),  # LayerNorm with SwiGLU: no HF family
    (dict(swiglu=True), "args.swiglu = True cannot be converted: Nemotron-4's MLP is squared ReLU"),
    (dict(add_qkv_bias=True), "attention_bias = true: not supported for Nemotron-4"),
    (dict(use_rope_scaling=True, rope_scaling_factor=8.0), "rope_scaling .* not supported for Nemotron-4"),
])
def test_nemotron_args_megatron_lm_can_hold_but_hf_cannot_are_refused(over, named):
    from dist_reshard.base.errors import ConversionError
    from dist_reshard.families import family_for
    from dist_reshard.source.megatron_source import config_from_args

    with pytest.raises(ConversionError, match=named):
        cfg = config_from_args(_nemotron_args(**over), "args")
        family_for(cfg.architecture).check(cfg)  # what planning the way back runs first


def test_nemotron_as_a_mamba_model_is_refused():
    from dist_reshard.base.errors import ConversionError
    from dist_reshard.families.gpt_hybrid import gpt_as_hybrid
    from dist_reshard.families.nemotron import NEMOTRON

    with pytest.raises(ConversionError, match="--layer-pattern: nemotron has LayerNorms with a bias"):
        gpt_as_hybrid(NEMOTRON)
