"""GLM-4.5 (`Glm4MoeForCausalLM`) and GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`): one torchrun job converts a
tiny seeded model of each to legacy TP2 x PP2 x EP2 and torch_dist TP2 x EP2, loads each into real Megatron-Core
on CPU with the HF logits (sigmoid router with its selection bias, shared expert, a dense first layer; GLM-4.5:
q/k/v bias, q/k norms, rotary on half of each head; GLM-4.7-Flash: multi-latent attention), and converts each
back to the HF folder's bytes; the files equal the reference transform bit for bit."""

import os

import pytest
import torch

from conftest import assert_same_hf, moe_family_job
from dist_reshard.testing.tiny_models import build_model, save_model
from test_gpt_oss import _edit_config, _plan
from test_moe import check_legacy, check_torch_dist


VARIANTS = ("glm4_moe", "glm4_moe_lite")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_model(build_model(v, seed=45), str(root / v)) for v in VARIANTS}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    return moe_family_job(models, tmp_path_factory.mktemp("glm4_moe_out"))


def test_glm4_moe_megatron_logits_match_hf(converted):
    for fmt, result in converted.items():
        assert result["rel_diff"] <= 1e-4, (fmt, result["rel_diff"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_glm4_moe_files_equal_reference(converted, variant, tmp_path):
    check_legacy(converted[f"{variant}-torch"])
    check_torch_dist(converted[f"{variant}-torch_dist"], tmp_path)


def test_glm4_moe_args(converted):
    args = torch.load(os.path.join(converted["glm4_moe-torch"]["save"], "iter_0000001", "mp_rank_00_000_000",
                                   "model_optim_rng.pt"), weights_only=False)["args"]
    assert (args.rotary_percent, args.qk_layernorm, args.add_qkv_bias) == (0.5, True, True)
    assert (args.moe_router_score_function, args.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert args.moe_layer_freq == [0, 1, 1, 1] and args.moe_router_topk_scaling_factor == 2.5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_glm4_moe_way_back_is_byte_identical(converted, models, variant, fmt):
    assert_same_hf(models[variant], converted[f"{variant}-{fmt}"]["back"])


def test_glm4_moe_routing_megatron_cannot_express_is_refused(models, tmp_path):
    import shutil

    from dist_reshard.base.errors import ConversionError

    folder = tmp_path / "hf"
    shutil.copytree(models["glm4_moe"], folder)
    _edit_config(folder, norm_topk_prob=False)
    with pytest.raises(ConversionError, match="Megatron-Core's router expresses only sigmoid scores with "
                                              "renormalised top-k weights"):
        _plan(folder)
