"""Ernie-4.5 MoE (`Ernie4_5_MoeForCausalLM`): one torchrun job converts a tiny seeded model to legacy TP2 x PP2 x EP2
and torch_dist TP2 x EP2, loads each into real Megatron-Core on CPU with the HF logits (interleaved rotary, softmax
router renormalised, two experts' worth of ungated shared expert, dense layers 0 and 3 around MoE layers 1-2, tied
embeddings), and converts both back to the HF folder's bytes, the all-zero selection biases included; the files
equal the reference transform bit for bit. A selection bias that changes the choice is refused by name."""

import os
import shutil

import pytest
import torch

from conftest import assert_same_hf, moe_family_job, torchrun, with_extra_tensors
from dist_reshard.testing.tiny_models import build_model, save_model
from test_gpt_oss import _edit_config, _plan
from test_moe import check_legacy, check_torch_dist

BIAS = "model.layers.1.mlp.moe_statics.e_score_correction_bias"


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    return save_model(build_model("ernie4_5_moe", seed=45), str(tmp_path_factory.mktemp("hf") / "ernie4_5_moe"))


@pytest.fixture(scope="module")
def converted(ernie, tmp_path_factory):
    return moe_family_job({"ernie4_5_moe": ernie}, tmp_path_factory.mktemp("ernie45_out"))


def _args(converted):
    return torch.load(os.path.join(converted["ernie4_5_moe-torch"]["save"], "iter_0000001", "mp_rank_00_000_000",
                                   "model_optim_rng.pt"), weights_only=False)["args"]


def test_ernie45_megatron_logits_match_hf(converted):
    for name, result in converted.items():
        print(name, result["rel_diff"])
        assert result["rel_diff"] <= 1e-4, (name, result["rel_diff"])


def test_ernie45_files_equal_reference(converted, tmp_path):
    check_legacy(converted["ernie4_5_moe-torch"])
    check_torch_dist(converted["ernie4_5_moe-torch_dist"], tmp_path)


def test_ernie45_args(converted):
    a = _args(converted)
    assert a.rotary_interleaved and a.rotary_base == 500000.0 and not a.untie_embeddings_and_output_weights
    assert (a.moe_router_score_function, a.moe_router_pre_softmax, a.moe_router_enable_expert_bias) == (
        "softmax", False, False)
    assert a.moe_router_topk_scaling_factor is None and a.moe_router_dtype == "fp32"
    assert (a.moe_shared_expert_intermediate_size, a.moe_shared_expert_gate) == (32, False)
    assert a.moe_layer_freq == [0, 1, 1, 0]
    # Megatron-LM's own args (no hf_architecture / hf_config): interleaved rotary with experts is Ernie-4.5, and
    # the HF config rebuilt from them states the same facts.
    from dist_reshard.config import arch_args
    from dist_reshard.config.hf_config import config_from_dict
    from dist_reshard.config.hf_export import hf_fields
    from dist_reshard.source.megatron_source import config_from_args, differing_facts

    del a.hf_architecture, a.hf_config, a.hf_model_type
    cfg = config_from_args(a, "args")
    assert cfg.architecture == "Ernie4_5_MoeForCausalLM"
    rebuilt = config_from_dict(hf_fields(cfg))
    assert not differing_facts(rebuilt, cfg) and rebuilt.rotary_interleaved
    assert arch_args.read(a, "args")["moe_layers"] == (False, True, True, False)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_ernie45_way_back_is_byte_identical(converted, ernie, fmt):
    assert_same_hf(ernie, converted[f"ernie4_5_moe-{fmt}"]["back"])


def _biased(ernie, folder):
    """The tiny model with a selection bias that changes which experts win, and its HF logits' relative change."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(ernie, folder)
    path = next(os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors") and BIAS in
                load_file(os.path.join(folder, f)))
    tensors = load_file(path)
    tensors[BIAS] = torch.linspace(-0.2, 0.2, tensors[BIAS].numel()).view_as(tensors[BIAS])
    save_file(tensors, path, metadata={"format": "pt"})
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain, biased = (AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()(tokens).logits
                         for f in (ernie, folder))
    return ((biased - plain).abs().max() / plain.abs().max()).item()


def test_ernie45_selection_bias_is_refused_by_name_before_anything_is_written(ernie, tmp_path):
    change = _biased(ernie, tmp_path / "biased")
    print("HF logits change with the bias:", change)
    assert change > 1e-3  # the bias changes which experts win: converting it without would not be the model
    save = tmp_path / "out"
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load",
                    str(tmp_path / "biased"), "--save", str(save), "--tp", "2", "--ep", "2", "--etp", "1",
                    check=False, timeout=120)
    assert proc.returncode != 0
    assert f"tensor {BIAS!r} has 8 non-zero elements" in proc.stderr + proc.stdout
    assert "Megatron-Core's expert bias works only with its sigmoid router" in proc.stderr + proc.stdout
    assert not save.exists()


@pytest.mark.parametrize("changes, message", [
    (dict(use_bias=True), "use_bias = true"),
    (dict(moe_norm_min=0.5), "moe_norm_min = 0.5 exceeds moe_k / moe_num_experts"),
    (dict(moe_num_experts=[8, 8]), "Ernie-4.5-VL's text and vision experts"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=500000.0)), "rope_type = 'yarn'"),
])
def test_ernie45_variants_megatron_cannot_express_are_refused(ernie, tmp_path, changes, message):
    from dist_reshard.base.errors import ConversionError

    folder = tmp_path / "hf"
    shutil.copytree(ernie, folder)
    _edit_config(folder, **changes)
    with pytest.raises(ConversionError, match=message):
        _plan(folder)


def test_ernie45_vl_tensors_are_refused_by_name(ernie, tmp_path):
    """An Ernie-4.5-VL checkpoint's vision tower under the text architecture: named, never dropped."""
    from dist_reshard.base.errors import ConversionError

    folder = with_extra_tensors(ernie, tmp_path / "hf", {"vision_model.patch_embed.proj.weight": torch.zeros(4, 4)})
    with pytest.raises(ConversionError, match="'vision_model.patch_embed.proj.weight': not mapped by the "
                                              "ernie4_5_moe family"):
        _plan(folder)


def test_ernie45_mtp_layer_is_refused_or_dropped_by_name(ernie, tmp_path):
    """The published checkpoints' MTP layer (`mtp_block.*`, `mtp_emb_norm.*`, ...; transformers skips every name
    holding "mtp"): refused naming it and --drop-mtp, and exactly those tensors are what --drop-mtp leaves out."""
    from dist_reshard.base.errors import ConversionError
    from dist_reshard.source.hf_source import mtp_tensors, open_hf_folder

    extra = {"mtp_block.0.input_layernorm.weight": torch.ones(64), "mtp_emb_norm.0.weight": torch.ones(64),
             "mtp_linear_proj.0.weight": torch.zeros(64, 128)}
    folder = with_extra_tensors(ernie, tmp_path / "hf", extra)
    with pytest.raises(ConversionError, match="'mtp_block.0.input_layernorm.weight': a multi-token-prediction "
                                              "tensor of the ernie4_5_moe family.*pass --drop-mtp"):
        _plan(folder)
    cfg, family, index = open_hf_folder(folder)
    assert mtp_tensors(index, cfg, family) == set(extra)

