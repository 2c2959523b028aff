"""GPT-OSS (`GptOssForCausalLM`): one torchrun job converts a tiny seeded model to TP2 x EP2 (legacy also PP2),
loads each output into real Megatron-Core on CPU (strict legacy load, torch_dist `dist_checkpointing.load`)
with learnable softmax offsets (the sinks), biases everywhere, the clamped quick-GELU GLU, alternating
sliding-window layers and YaRN, and compares the logits with HF's; the files equal the reference transform
bit for bit, and both convert back to the HF folder's bytes in the same job; an MXFP4 source converts as the
bf16 model transformers decodes it to. Variants Megatron-Core cannot express are refused by name, without a
process group."""

import json
import os
import shutil

import pytest
import torch

from conftest import assert_same_hf, load_hf_config, load_hf_state, mcore_check, run_cases
from dist_reshard.testing.tiny_models import build_model, save_model
from test_moe import check_legacy, check_torch_dist

LAYOUT = dict(tp=2, pp=1, ep=2, etp=1)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return save_model(build_model("gpt_oss", seed=20), str(tmp_path_factory.mktemp("hf") / "gpt_oss"))


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    """(MXFP4 folder, the bf16 folder transformers decodes it to) from a bf16 tiny model."""
    from mxfp4_reference import make_mxfp4_pair

    root = tmp_path_factory.mktemp("mxfp4")
    bf16 = save_model(build_model("gpt_oss", seed=21, dtype="bfloat16"), str(root / "bf16"))
    make_mxfp4_pair(bf16, str(root / "mxfp4"), str(root / "dequantized"))
    return str(root / "mxfp4"), str(root / "dequantized")


@pytest.fixture(scope="module")
def converted(gpt_oss, gpt_oss_mxfp4, tmp_path_factory):
    """Both formats converted, loaded into Megatron-Core and run, a reshard, both converted back: one 4-rank
    job (legacy TP2 x PP2, torch_dist TP2 x DP2, the reshard TP1 x PP2 x DP2; EP2 x ETP1)."""
    root = tmp_path_factory.mktemp("gpt_oss_out")
    cases = [dict(LAYOUT, pp=2 if fmt == "torch" else 1, load=gpt_oss, save=str(root / fmt), format=fmt,
                  impl="local", name=fmt, back=str(root / f"{fmt}-back")) for fmt in ("torch", "torch_dist")]
    # torch_dist TP2 x EP2 resharded to legacy TP1 x PP2 x EP2, loaded with the HF model's logits.
    reshard = dict(LAYOUT, tp=1, pp=2, src="mcore", load=cases[1]["save"], hf=gpt_oss, save=str(root / "reshard"),
                   format="torch", impl="local", name="reshard")
    # MXFP4 experts decoded on reading, against the model transformers decodes them to.
    mxfp4 = dict(LAYOUT, load=gpt_oss_mxfp4[0], hf=gpt_oss_mxfp4[1], save=str(root / "mxfp4"), format="torch_dist",
                 impl="local", name="mxfp4")
    back = [dict(dst="hf", load=c["save"], save=c["back"]) for c in cases]
    return {r["name"]: r for r in mcore_check(4, cases + [reshard, mxfp4] + back, root)}


def test_gpt_oss_megatron_logits_match_hf(converted):
    for fmt, result in converted.items():
        assert result["rel_diff"] <= 1e-4, (fmt, result["rel_diff"])


def test_gpt_oss_files_equal_reference(converted, gpt_oss, tmp_path):
    check_legacy(converted["torch"])
    check_torch_dist(converted["torch_dist"], tmp_path)
    check_legacy(dict(converted["reshard"], load=gpt_oss))  # the reshard: as if converted from HF
    check_torch_dist(dict(converted["mxfp4"], load=converted["mxfp4"]["hf"]), tmp_path)  # MXFP4: as if from bf16


def test_gpt_oss_te_and_grouped_gemm_names_equal_reference(gpt_oss, tmp_path):
    """The default TransformerEngine-spec names (no TE on CPU to load them): legacy files with grouped-GEMM expert
    weights and biases (`linear_fc1.weight<e>`, `linear_fc1.bias<e>`), and SequentialMLP ones, bit for bit."""
    cases = [dict(LAYOUT, load=gpt_oss, save=str(tmp_path / f"te-{grouped}"), format="torch", grouped=grouped)
             for grouped in (True, False)]
    run_cases(2, cases, tmp_path)
    for case in cases:
        check_legacy(case)


def test_gpt_oss_args_state_what_megatron_builds(converted):
    args = torch.load(os.path.join(converted["torch"]["save"], "iter_0000001", "mp_rank_00_000_000", "model_optim_rng.pt"),
                      weights_only=False)["args"]
    assert (args.softmax_type, args.add_bias_linear, args.quick_geglu, args.swiglu) == ("learnable", True, True, False)
    assert (args.glu_linear_offset, args.activation_func_clamp_value) == (1.0, 0.6)
    assert args.window_size == (3, 0) and args.window_attn_skip_freq == [1, 0, 1, 0]
    assert args.position_embedding_type == "yarn" and args.yarn_correction_range_round_to_int is False


def _plan(folder, layout=None):
    from dist_reshard.source.hf_source import open_hf_folder
    from dist_reshard.config.layout import TargetLayout
    from dist_reshard.plan.planner import make_plan

    cfg, family, index = open_hf_folder(str(folder))
    return make_plan(family, index, cfg, layout or TargetLayout(tp=2, ep=2, etp=1), world=2)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("changes, message", [
    (dict(swiglu_alpha=1.5), "swiglu_alpha = 1.5: Megatron-Core's quick-GELU GLU"),
    (dict(attention_bias=False), "attention_bias = false"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "sliding_attention", "full_attention"]),
     "layer_types"),
])
def test_gpt_oss_variants_megatron_cannot_express_are_refused(gpt_oss, tmp_path, changes, message):
    from dist_reshard.base.errors import ConversionError

    folder = tmp_path / "hf"
    shutil.copytree(gpt_oss, folder)
    _plan(folder)  # as saved: plans
    _edit_config(folder, **changes)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("'", "'")):
        _plan(folder)


def test_gpt_oss_expert_tensor_parallelism_is_refused(gpt_oss):
    from dist_reshard.base.errors import ConversionError
    from dist_reshard.config.layout import TargetLayout

    with pytest.raises(ConversionError, match="--etp 2: Megatron-Core supports biases in MoE layers only with an "
                                              "expert tensor-parallel size of 1"):
        _plan(gpt_oss, TargetLayout(tp=2, ep=2))


def test_mxfp4_expert_without_its_scales_is_refused(gpt_oss_mxfp4, tmp_path):
    from safetensors.torch import load_file, save_file

    from dist_reshard.base.errors import ConversionError

    folder = tmp_path / "hf"
    shutil.copytree(gpt_oss_mxfp4[0], folder)
    path = str(folder / "model.safetensors")
    state = load_file(path)
    del state["model.layers.2.mlp.experts.down_proj_scales"]
    save_file(state, path)
    with pytest.raises(ConversionError, match=r"MXFP4 tensor 'model\.layers\.2\.mlp\.experts\.down_proj_blocks' has "
                                              r"no 'model\.layers\.2\.mlp\.experts\.down_proj_scales'"):
        _plan(folder)


def test_gpt_oss_fused_expert_of_wrong_shape_is_refused(gpt_oss, tmp_path):
    from dist_reshard.base.errors import ConversionError

    folder = tmp_path / "hf"
    shutil.copytree(gpt_oss, folder)
    _edit_config(folder, intermediate_size=16)
    with pytest.raises(ConversionError, match=r"mlp\.experts\.gate_up_proj' is F32 \[4, 64, 64\]; 4 experts need "
                                              r"\[4, 64, 32\]"):
        _plan(folder)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_gpt_oss_way_back_is_byte_identical(converted, gpt_oss, fmt):
    """Megatron -> HF writes the fused expert tensors again: every tensor's bytes and the config as they were."""
    assert_same_hf(gpt_oss, converted[fmt]["back"])


def test_mxfp4_experts_decode_as_transformers_decodes_them(gpt_oss_mxfp4):
    """Each expert's MXFP4 slab (blocks and scales) decodes to transformers' own dequantization, unfused."""
    from dist_reshard.read.decode import read_rows
    from dist_reshard.source.hf_source import open_hf_folder
    from dist_reshard.read.reader import RangeReader

    decoded = load_hf_state(gpt_oss_mxfp4[1])
    _cfg, _family, index = open_hf_folder(gpt_oss_mxfp4[0])
    reader = RangeReader()
    for layer in range(4):
        p = f"model.layers.{layer}.mlp.experts."
        for e in range(4):
            gate_up, down = decoded[p + "gate_up_proj"][e], decoded[p + "down_proj"][e]
            for name, want in ((f"{e}.gate_up_proj", torch.cat([gate_up[:, 0::2].t(), gate_up[:, 1::2].t()])),
                               (f"{e}.down_proj", down.t())):
                src = index[p + name]
                assert src.encoding == "mxfp4" and src.dtype == "BF16"
                got = read_rows(reader, src, (0, src.rows), index).view(torch.bfloat16).view(src.shape)
                assert torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16)), p + name


def test_fused_expert_views_read_the_bytes_hf_holds(gpt_oss):
    """Each per-expert view decodes, from its own slab of the file, to the reference unfusing."""
    from dist_reshard.read.decode import read_rows
    from dist_reshard.base.dtypes import TORCH_DTYPES
    from dist_reshard.source.hf_source import open_hf_folder
    from dist_reshard.read.reader import RangeReader

    hf, config = load_hf_state(gpt_oss), load_hf_config(gpt_oss)
    _cfg, _family, index = open_hf_folder(gpt_oss)
    reader = RangeReader()
    p = "model.layers.1.mlp.experts."
    gate_up, down = hf[p + "gate_up_proj"][3], hf[p + "down_proj"][3]
    expected = {"3.gate_up_proj": torch.cat([gate_up[:, 0::2].t(), gate_up[:, 1::2].t()]),
                "3.down_proj": down.t(), "3.down_proj_bias": hf[p + "down_proj_bias"][3],
                "3.gate_up_proj_bias": torch.cat([hf[p + "gate_up_proj_bias"][3][0::2],
                                                  hf[p + "gate_up_proj_bias"][3][1::2]])}
    for name, want in expected.items():
        src = index[p + name]
        got = read_rows(reader, src, (0, src.rows), index).view(TORCH_DTYPES[src.dtype]).view(src.shape)
        assert torch.equal(got, want), name
    assert config.num_local_experts == 4
