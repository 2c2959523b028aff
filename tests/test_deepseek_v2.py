"""DeepSeek-V2 and V2-Lite (`DeepseekV2ForCausalLM`): one torchrun job converts a tiny seeded model of each to
legacy TP2 x PP2 x EP2 and torch_dist TP2 x EP2, loads each into real Megatron-Core on CPU with the HF logits
(multi-latent attention, V2-Lite without q LoRA; softmax router not renormalised, V2 limited to 2 of 4 expert
groups and scaled, V2-Lite plain greedy; shared expert; a dense first layer), and converts each back to the HF
folder's bytes; the files equal the reference transform bit for bit."""

import os
import shutil

import pytest
import torch

from conftest import assert_same_hf, moe_family_job
from dist_reshard.testing.tiny_models import build_model, save_model
from test_gpt_oss import _edit_config, _plan
from test_moe import check_legacy, check_torch_dist


VARIANTS = ("deepseek_v2", "deepseek_v2_lite")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_model(build_model(v, seed=46), str(root / v)) for v in VARIANTS}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    return moe_family_job(models, tmp_path_factory.mktemp("deepseek_v2_out"))


def test_deepseek_v2_megatron_logits_match_hf(converted):
    for name, result in converted.items():
        print(name, result["rel_diff"])
        assert result["rel_diff"] <= 1e-4, (name, result["rel_diff"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_deepseek_v2_files_equal_reference(converted, variant, tmp_path):
    check_legacy(converted[f"{variant}-torch"])
    check_torch_dist(converted[f"{variant}-torch_dist"], tmp_path)


def test_deepseek_v2_args(converted):
    def args(variant):
        return torch.load(os.path.join(converted[f"{variant}-torch"]["save"], "iter_0000001", "mp_rank_00_000_000",
                                       "model_optim_rng.pt"), weights_only=False)["args"]

    v2, lite = args("deepseek_v2"), args("deepseek_v2_lite")
    for a in (v2, lite):
        assert a.multi_latent_attention and a.moe_router_score_function == "softmax" and a.moe_router_pre_softmax
        assert not a.moe_shared_expert_gate and not a.moe_router_enable_expert_bias
        assert a.moe_layer_freq == [0, 1, 1, 1]
    assert (v2.q_lora_rank, v2.moe_router_num_groups, v2.moe_router_group_topk) == (32, 4, 2)
    assert v2.moe_router_topk_scaling_factor == 2.5
    assert (lite.q_lora_rank, lite.moe_router_num_groups, lite.moe_router_group_topk) == (None, None, None)
    # Without this project's hf_architecture / hf_config (Megatron-LM's own args), MLA with a softmax router is V2.
    from dist_reshard.config import arch_args
    from dist_reshard.source.megatron_source import architecture_from_args

    for a in (v2, lite):
        del a.hf_architecture, a.hf_config
        assert architecture_from_args(a, arch_args.read(a, "args"), "args") == "DeepseekV2ForCausalLM"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_deepseek_v2_way_back_is_byte_identical(converted, models, variant, fmt):
    assert_same_hf(models[variant], converted[f"{variant}-{fmt}"]["back"])


@pytest.mark.parametrize("changes, message", [
    # The published DeepSeek-V2 (top 6 of 160 in 3 of 8 groups): HF ranks groups by their best score.
    (dict(n_group=4, topk_group=1), "Megatron-Core ranks expert groups by the sum of their top 3 scores where HF "
                                    "uses the best one"),
    (dict(norm_topk_prob=True), "DeepSeek-V2 scores by softmax without renormalising"),
    (dict(topk_method="noaux_tc"), "topk_method 'noaux_tc': DeepSeek-V2 routes by greedy or group_limited_greedy"),
    (dict(mlp_bias=True), "mlp_bias = true"),
])
def test_deepseek_v2_routing_megatron_cannot_express_is_refused(models, tmp_path, changes, message):
    from dist_reshard.base.errors import ConversionError

    folder = tmp_path / "hf"
    shutil.copytree(models["deepseek_v2"], folder)
    _edit_config(folder, **changes)
    with pytest.raises(ConversionError, match=message):
        _plan(folder)
