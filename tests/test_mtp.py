"""Multi-token-prediction layers kept (DeepSeek-V3, GLM-4.5): one 4-rank torchrun job converts tiny seeded models
with one MTP layer to legacy TP2 x PP2 x EP2 (the MTP block and its copy of the embedding on the last stage; also
split by a layout string holding `m`) and torch_dist TP2 x EP2 (written even and loaded by a layout string, and
written by a layout string and loaded even); real Megatron-Core GPTModels built with the MTP block spec strictly
load every rank's legacy file or `dist_checkpointing.load` the torch_dist folder, with the main logits equal to
HF's and the MTP layer's logits equal to transformers' MTP modules' (reference_mtp.hf_mtp_logits); each output
equals the reference transform bit for bit and converts back to the HF folder's bytes."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import assert_same_hf, load_hf_config, load_hf_state, mcore_check, torchrun
from dist_reshard.base.errors import ConversionError
from dist_reshard.source.hf_source import open_hf_folder
from dist_reshard.config.layout import TargetLayout
from dist_reshard.plan.planner import make_plan
from dist_reshard.testing.tiny_models import build_model, save_model
from reference_mtp import mtp_legacy_files, mtp_torch_dist_tensors
from test_moe import _assert_bitwise, _file

VARIANTS = ("deepseek_v3_mtp", "glm4_moe_mtp")
LAYOUT = "Et|tttmL"  # 1 and 3 decoder layers, the MTP layer on the last stage with the loss
MOE = dict(tp=2, ep=2, etp=1, impl="local")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_model(build_model(v, seed=61), str(root / v), mtp_layers=1, seed=61) for v in VARIANTS}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mtp_out"))

    def case(name, variant, **kw):
        return dict(MOE, load=models[variant], save=os.path.join(out, name), name=name, variant=variant, **kw)

    cases = [case("dsv3-torch", "deepseek_v3_mtp", pp=2, format="torch"),
             case("dsv3-layout-torch", "deepseek_v3_mtp", pp=2, format="torch", stage_layout=LAYOUT),
             # written even, loaded split by the layout string; and the other way round
             case("dsv3-torch_dist", "deepseek_v3_mtp", pp=1, format="torch_dist", load_pp=2,
                  load_split=dict(stage_layout=LAYOUT)),
             case("dsv3-layout-torch_dist", "deepseek_v3_mtp", pp=2, format="torch_dist", stage_layout=LAYOUT,
                  load_split={}),
             case("glm-torch", "glm4_moe_mtp", pp=2, format="torch"),
             case("glm-torch_dist", "glm4_moe_mtp", pp=1, format="torch_dist")]
    back = [dict(dst="hf", load=c["save"], save=c["save"] + "-back") for c in cases]
    results = {r["name"]: r for r in mcore_check(4, cases + back, out)}
    for c in cases:
        results[c["name"]]["back"] = c["save"] + "-back"
    return results


def test_mtp_megatron_logits_match_hf(converted):
    assert len(converted) == 6
    for name, result in converted.items():
        assert result["rel_diff"] <= 1e-4, (name, result["rel_diff"])


def test_mtp_layer_logits_match_transformers_mtp_modules(converted):
    """The MTP layer's own logits (Megatron-Core's MultiTokenPredictionBlock through the shared output layer)
    against transformers' MtpModel loaded with the HF layer's tensors (reference_mtp.hf_mtp_logits)."""
    for name, result in converted.items():
        assert len(result["mtp_rel_diff"]) == 1, name
        assert result["mtp_rel_diff"][0] <= 1e-4, (name, result["mtp_rel_diff"])


@pytest.mark.parametrize("name", ["dsv3-torch", "dsv3-layout-torch", "glm-torch"])
def test_mtp_legacy_files_equal_reference(converted, name):
    case = converted[name]
    hf, config = load_hf_state(case["load"]), load_hf_config(case["load"])
    sizes = [1, 3] if case.get("stage_layout") else None
    expected = mtp_legacy_files(hf, config, case["tp"], case["pp"], case["ep"], case["etp"], case["impl"], sizes)
    root = os.path.join(case["save"], "iter_0000001")
    assert sorted(os.listdir(root)) == sorted(_file(*key, case) for key in expected)
    for key, containers in expected.items():
        sd = torch.load(os.path.join(root, _file(*key, case), "model_optim_rng.pt"), weights_only=False)
        assert sd["args"].mtp_num_layers == 1 and sd["args"].mtp_loss_scaling_factor == 0.1
        got = {k: v for k, v in sd["model"].items() if not k.endswith("._extra_state")}
        assert sorted(got) == sorted(containers["model"]), key
        for k, v in containers["model"].items():
            _assert_bitwise(got[k], v, f"{key}/{k}")
        if key[1] == case["pp"] - 1:
            assert "mtp.layers.0.eh_proj._extra_state" in sd["model"]


@pytest.mark.parametrize("name", ["dsv3-torch_dist", "dsv3-layout-torch_dist", "glm-torch_dist"])
def test_mtp_torch_dist_equals_reference(converted, name, tmp_path):
    case = converted[name]
    hf, config = load_hf_state(case["load"]), load_hf_config(case["load"])
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(case["save"], "iter_0000001"), flat)
    got = torch.load(flat, weights_only=False)
    expected = mtp_torch_dist_tensors(hf, config, case["tp"], case["impl"])
    tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        _assert_bitwise(tensors[k], v, k)
    assert "mtp.layers.0.eh_proj._extra_state/shard_0_1" in got
    args = torch.load(os.path.join(case["save"], "iter_0000001", "common.pt"), weights_only=False)["args"]
    assert args.mtp_num_layers == 1


@pytest.mark.parametrize("name", ["dsv3-torch", "dsv3-layout-torch", "dsv3-torch_dist", "dsv3-layout-torch_dist",
                                  "glm-torch", "glm-torch_dist"])
def test_mtp_way_back_is_byte_identical(converted, name):
    assert_same_hf(converted[name]["load"], converted[name]["back"])


def test_mtp_copy_that_differs_is_refused_by_name(models, tmp_path):
    """Megatron shares the main embedding and head with its MTP layers: a differing HF copy cannot be kept."""
    folder = tmp_path / "hf"
    shutil.copytree(models["deepseek_v3_mtp"], folder)
    path = folder / "model-mtp.safetensors"
    state = load_file(str(path))
    state["model.layers.4.shared_head.head.weight"][7, 3] += 1.0
    save_file(state, str(path), metadata={"format": "pt"})
    base = ["-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", str(folder), "--tp", "2"]
    refused = torchrun(2, *base, "--save", str(tmp_path / "out"), check=False, timeout=120)
    errors = [line for line in refused.stderr.splitlines() if "dist_reshard: error:" in line]
    assert refused.returncode != 0 and len(errors) == 2, refused.stderr[-3000:]
    assert all("'model.layers.4.shared_head.head.weight' differs from 'lm_head.weight' (first in row 7)" in e
               for e in errors)
    assert not (tmp_path / "out").exists()
    dropped = torchrun(2, *base, "--save", str(tmp_path / "dropped"), "--drop-mtp", timeout=120)
    assert "dropped on request (--drop-mtp): " in dropped.stdout + dropped.stderr
    args = torch.load(str(tmp_path / "dropped" / "iter_0000001" / "common.pt"), weights_only=False)["args"]
    assert args.mtp_num_layers is None


def _plan(folder, **layout):
    cfg, family, index = open_hf_folder(str(folder))
    return make_plan(family, index, cfg, TargetLayout(**layout), 2)


@pytest.mark.parametrize("layout, message", [
    ("Ettt|tL", "it holds 0 MTP layers (m), the model 1 (mtp_num_layers); pass --drop-mtp"),
    ("Ettm|ttL", "decoder layers must be placed before MTP layers"),
    ("Etttt|m||L", "the MTP layers must be in the last virtual pipeline stage of their pipeline rank"),
])
def test_mtp_layouts_megatron_refuses_are_refused(models, layout, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _plan(models["deepseek_v3_mtp"], pp=2, stage_layout=layout)


def test_more_mtp_layers_than_declared_are_refused(models, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(models["glm4_moe_mtp"], folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 0
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match=r"hold layers \[4\] past num_hidden_layers = 4, but config.json "
                                              r"declares num_nextn_predict_layers = 0"):
        _plan(folder, tp=2)


def test_671b_layouts_with_mtp_are_ones_megatron_core_accepts():
    """tests/synthetic.py's PP16 layout strings for DeepSeek-V3-671B (planned at scale in test_rank_plan.py and
    bench/plan_scale.py) pass Megatron-Core's own check for 61 decoder layers and one MTP layer."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    from synthetic import DEEPSEEK_PP16_LAYOUT, DEEPSEEK_VPP2_LAYOUT

    vpp2 = PipelineParallelLayerLayout(DEEPSEEK_VPP2_LAYOUT, 16)
    assert vpp2.virtual_pipeline_model_parallel_size == 2
    assert vpp2.validate_layer_layout(61, 1) is True  # "MTP standalone": pipeline rank 14, not the last
    assert TargetLayout(pp=16, stage_layout=DEEPSEEK_VPP2_LAYOUT).mtp_stage() == (14, 1)
    assert PipelineParallelLayerLayout(DEEPSEEK_PP16_LAYOUT, 16).validate_layer_layout(61, 1) is False
    assert TargetLayout(pp=16, stage_layout=DEEPSEEK_PP16_LAYOUT).mtp_stage() == (15, 0)
