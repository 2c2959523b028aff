"""Qwen3-Next (`Qwen3NextForCausalLM`) and Qwen3.5 (`Qwen3_5ForCausalLM`, `Qwen3_5MoeForCausalLM`): one 4-rank
torchrun job converts a tiny seeded model of each (gated DeltaNet and gated attention layers alternating; Qwen3-Next:
routed experts with a gated shared expert, one dense layer; Qwen3.5: its split DeltaNet input projections, dense
MLPs or experts in every layer) to legacy TP2 x PP2 (x EP2) and torch_dist TP2 x EP2 (dense: TP2 x PP2), loads
each into Megatron-Core's real gated-DeltaNet GPTModel on CPU (tests/qwen3_next_cpu.py) with the HF logits, and
converts each back to the HF folder's bytes; the files equal an independent reference transform
(tests/reference_qwen3_next.py) bit for bit."""

import json
import os
import re
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import assert_same_hf, load_hf_config, load_hf_state, torchrun
from dist_reshard.base.errors import ConversionError
from dist_reshard.config.layout import TargetLayout
from dist_reshard.testing.tiny_models import build_model, save_model
from reference_qwen3_next import full_megatron, torch_dist_tensors, tp_shard
from test_gpt_oss import _edit_config, _plan
from test_moe import _assert_bitwise

MOE_CASES = [dict(format="torch", tp=2, pp=2, ep=2, etp=1), dict(format="torch_dist", tp=2, pp=1, ep=2, etp=1)]
DENSE_CASES = [dict(format=f, tp=2, pp=2, ep=1, etp=None) for f in ("torch", "torch_dist")]
MODELS = {"qwen3_next": MOE_CASES, "qwen3_5": DENSE_CASES, "qwen3_5_moe": MOE_CASES}
CONVERTED = [(m, fmt) for m in MODELS for fmt in ("torch", "torch_dist")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {m: save_model(build_model(m, seed=47), str(root / m)) for m in MODELS}


@pytest.fixture(scope="module")
def model(models):
    return models["qwen3_next"]


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("qwen3_next_out")
    cases = [dict(c, model=m, load=models[m], save=str(work / m / c["format"]),
                  back=str(work / m / f"{c['format']}-back")) for m, model_cases in MODELS.items() for c in model_cases]
    path, out = str(work / "cases.json"), str(work / "results.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(4, "tests/workers/qwen3_next_check.py", path, out, timeout=900)
    with open(out) as f:
        return {(r["model"], r["format"]): r for r in json.load(f)}


def test_qwen3_next_megatron_logits_match_hf(converted):
    assert sorted(converted) == sorted(CONVERTED)
    for key, result in converted.items():
        print(key, result["rel_diff"])
        assert result["rel_diff"] <= 1e-4, (key, result["rel_diff"])


@pytest.mark.parametrize("name", list(MODELS))
def test_qwen3_next_legacy_files_equal_reference(converted, name):
    case = converted[name, "torch"]
    hf, config = load_hf_state(case["load"]), load_hf_config(case["load"])
    full = full_megatron(hf, config, case["tp"])
    per_stage, per_ep = config.num_hidden_layers // case["pp"], getattr(config, "num_experts", 0) // case["ep"]
    root, seen = os.path.join(case["save"], "iter_0000001"), set()
    for r in range(case["tp"]):
        for p in range(case["pp"]):
            for k in range(case["ep"]):
                rank = f"mp_rank_{r:02d}" + (f"_{p:03d}" if case["pp"] > 1 else "") + (
                    f"_{k:03d}" if case["ep"] > 1 else "")
                sd = torch.load(os.path.join(root, rank, "model_optim_rng.pt"), weights_only=False)
                assert sd["checkpoint_version"] == 3.0
                for key, t in sd["model"].items():
                    if key.endswith("._extra_state"):
                        assert t is None
                        continue
                    parts = key.split(".")
                    if key.startswith("decoder.layers."):
                        parts[2] = str(p * per_stage + int(parts[2]))
                    if "local_experts" in parts:
                        at = parts.index("local_experts") + 1
                        parts[at] = str(k * per_ep + int(parts[at]))
                    name = ".".join(parts)
                    _assert_bitwise(t, tp_shard(name, full[name], config, case["tp"], r), f"{r}/{p}/{k}: {key}")
                    seen.add(name)
    assert seen == set(full)


@pytest.mark.parametrize("name", list(MODELS))
def test_qwen3_next_torch_dist_equals_reference(converted, tmp_path, name):
    case = converted[name, "torch_dist"]
    hf, config = load_hf_state(case["load"]), load_hf_config(case["load"])
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(case["save"], "iter_0000001"), flat)
    got = torch.load(flat, weights_only=False)
    tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    expected = torch_dist_tensors(full_megatron(hf, config, case["tp"]), config)
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        _assert_bitwise(tensors[k], v, k)
    assert "decoder.layers.0.self_attention.in_proj._extra_state/shard_0_1" in got
    assert "decoder.layers.0.self_attention.out_proj._extra_state/shard_0_1" in got


def test_qwen3_next_args(converted):
    sd = torch.load(os.path.join(converted["qwen3_next", "torch"]["save"], "iter_0000001", "mp_rank_00_000_000",
                                 "model_optim_rng.pt"), weights_only=False)
    a = sd["args"]
    assert a.experimental_attention_variant == "gated_delta_net" and a.linear_attention_freq == [1, 0, 1, 0]
    assert a.layernorm_zero_centered_gamma and a.apply_layernorm_1p and a.attention_output_gate and a.qk_layernorm
    assert (a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim, a.linear_value_head_dim,
            a.linear_conv_kernel_dim) == (2, 4, 8, 8, 4)
    assert a.rotary_percent == 0.25 and a.moe_shared_expert_gate and a.moe_layer_freq == [1, 1, 0, 1]
    # Without this project's stored HF config the args alone still name the family and rebuild its config.
    from dist_reshard.config.hf_export import hf_fields
    from dist_reshard.source.megatron_source import config_from_args

    del a.hf_architecture, a.hf_config
    cfg = config_from_args(a, "args")
    assert cfg.architecture == "Qwen3NextForCausalLM"
    fields = hf_fields(cfg)
    assert fields["layer_types"] == load_hf_config(converted["qwen3_next", "torch"]["load"]).layer_types
    assert fields["partial_rotary_factor"] == 0.25 and fields["mlp_only_layers"] == [2]


@pytest.mark.parametrize("name, fmt", CONVERTED)
def test_qwen3_next_way_back_is_byte_identical(converted, models, name, fmt):
    assert_same_hf(models[name], converted[name, fmt]["back"])


@pytest.mark.parametrize("changes, layout, message", [
    (dict(attention_bias=True), None, "attention_bias = true"),
    (dict(hidden_act="gelu"), None, "hidden_act 'gelu'"),
    (dict(linear_num_value_heads=3), None, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    (dict(layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]), None,
     "layer_types holds 'sliding_attention'"),
    ({}, TargetLayout(tp=2, ep=2, etp=1, transformer_impl="local"), "--transformer-impl local"),
    (dict(linear_num_key_heads=1, linear_num_value_heads=4), TargetLayout(tp=2, ep=2, etp=1),
     "--tp 2 does not divide linear_num_key_heads 1"),
])
def test_qwen3_next_variants_megatron_cannot_express_are_refused(model, tmp_path, changes, layout, message):
    folder = tmp_path / "hf"
    shutil.copytree(model, folder)
    _edit_config(folder, **changes)
    with pytest.raises(ConversionError, match=message):
        _plan(folder, layout)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_qwen3_next_verify_and_compare_see_the_shifted_norm_as_hf(converted, model, fmt):
    """verify and inspect compare rebuild the gated DeltaNet norm Megatron holds as weight - 1 the way the
    converter does: the output verifies against its source and compares equal to it tensor by tensor."""
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    save = converted["qwen3_next", fmt]["save"]
    verify = subprocess.run([sys.executable, "-m", "dist_reshard.verify", save, "--against", model], env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    compare = subprocess.run([sys.executable, "-m", "dist_reshard.inspect", "compare", model, save], env=env,
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0 and re.search(r"^0 of \d+ tensors differ$", compare.stdout, re.M), \
        compare.stdout[-2000:] + compare.stderr[-2000:]
    assert "linear_attn.norm.weight max_abs_diff=0" in compare.stdout  # the shifted tensors are compared


@pytest.mark.parametrize("name, derived", [("qwen3_5", "Qwen3_5ForCausalLM"), ("qwen3_5_moe", "Qwen3NextForCausalLM")])
def test_qwen3_5_args_name_the_family_and_rebuild_its_config(converted, name, derived):
    """Megatron-LM's args alone: a dense gated DeltaNet model is Qwen3.5; with experts the modules are Qwen3-Next's
    and Qwen3.5-MoE's alike, and this project's args.hf_architecture picks. Either way the rebuilt config.json
    states the same facts, under fields transformers' config class takes."""
    from transformers import AutoConfig

    from dist_reshard.config.hf_config import config_from_dict
    from dist_reshard.config.hf_export import hf_fields
    from dist_reshard.source.megatron_source import config_from_args, differing_facts

    case = converted[name, "torch"]
    rank = "mp_rank_00_000" + ("_000" if case["ep"] > 1 else "")
    a = torch.load(os.path.join(case["save"], "iter_0000001", rank, "model_optim_rng.pt"), weights_only=False)["args"]
    assert a.experimental_attention_variant == "gated_delta_net" and a.linear_attention_freq == [1, 0, 1, 0]
    assert a.rotary_percent == 0.25 and a.layernorm_zero_centered_gamma and a.attention_output_gate
    source = config_from_dict(json.load(open(os.path.join(case["load"], "config.json"))))
    del a.hf_config
    kept = config_from_args(a, "args")
    assert kept.architecture == source.architecture and not differing_facts(kept, source)
    del a.hf_architecture
    assert config_from_args(a, "args").architecture == derived
    fields = hf_fields(kept)
    assert not differing_facts(config_from_dict(fields), source)
    hf = AutoConfig.for_model(**{k: v for k, v in fields.items() if k != "architectures"})
    assert (hf.layer_types, hf.linear_num_value_heads) == (source.raw["layer_types"], 4)


@pytest.mark.parametrize("name, changes, layout, message", [
    ("qwen3_5", dict(architectures=["Qwen3_5ForConditionalGeneration"]), None,
     "unsupported architecture 'Qwen3_5ForConditionalGeneration'"),
    ("qwen3_5_moe", dict(shared_expert_intermediate_size=0), None, "shared_expert_intermediate_size 0"),
    ("qwen3_5", dict(attention_bias=True), TargetLayout(tp=2), "attention_bias = true"),
    ("qwen3_5", {}, TargetLayout(tp=2, transformer_impl="local"), "--transformer-impl local"),
    ("qwen3_5_moe", dict(linear_num_key_heads=1, linear_num_value_heads=4), TargetLayout(tp=2, ep=2, etp=1),
     "--tp 2 does not divide linear_num_key_heads 1"),
])
def test_qwen3_5_variants_megatron_cannot_express_are_refused(models, tmp_path, name, changes, layout, message):
    folder = tmp_path / "hf"
    shutil.copytree(models[name], folder)
    _edit_config(folder, **changes)
    with pytest.raises(ConversionError, match=message):
        _plan(folder, layout)


def test_qwen3_next_mtp_module_is_refused_or_dropped_by_name(model, tmp_path):
    """The published checkpoints store an `mtp.*` module (transformers skips it; Megatron-Core builds MTP layers
    only from decoder-layer specs): refused naming it and --drop-mtp, or left out with --drop-mtp, the rank files
    then equal to those of the folder without it."""
    import hashlib
    import subprocess
    import sys

    from conftest import ROOT, with_extra_tensors

    folder = with_extra_tensors(model, tmp_path / "with_mtp", {"mtp.fc.weight": torch.randn(64, 128),
                                                               "mtp.layers.0.input_layernorm.weight": torch.ones(64)})
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)

    def convert(load, save, *flags):
        return subprocess.run([sys.executable, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load",
                               str(load), "--save", str(save), "--tp", "2", "--ckpt-format", "torch", *flags],
                              env=env, capture_output=True, text=True, timeout=300)

    refused = convert(folder, tmp_path / "refused")
    assert refused.returncode == 1 and not (tmp_path / "refused").exists()
    first = refused.stderr.strip().splitlines()[0]
    assert "mtp.fc.weight" in first and "--drop-mtp" in first, first
    dropped = convert(folder, tmp_path / "dropped", "--drop-mtp")
    assert dropped.returncode == 0, dropped.stderr[-2000:]
    assert "dropped on request (--drop-mtp): 2 multi-token-prediction tensors" in dropped.stdout
    plain = convert(model, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]

    def rank_files(save):
        root = save / "iter_0000001"
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.pt")}

    assert rank_files(tmp_path / "dropped") == rank_files(tmp_path / "plain") != {}
