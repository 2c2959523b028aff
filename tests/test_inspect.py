"""The inspector on each format, logical tensors read back from any layout, and `compare` catching one bit."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_hf_state, run_cases

CASES = [("qwen3", "torch", dict(tp=2, pp=2)), ("qwen3", "torch_dist", dict(tp=2, pp=2)),
         ("llama3.2", "torch", dict(tp=1, pp=2, vpp=2)), ("qwen2", "torch_dist", dict(tp=2, pp=1)),
         ("llama3", "torch", dict(tp=2, pp=1))]


@pytest.fixture(scope="module")
def outputs(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    cases = [dict(lay, name=f"{v}-{fmt}", load=hf_models[v], save=str(root / f"{v}-{fmt}"), format=fmt,
                  impl="local" if v == "llama3" else "transformer_engine") for v, fmt, lay in CASES]
    run_cases(2, cases, root)
    return {c["name"]: c for c in cases}


def _inspect(*args):
    proc = subprocess.run([sys.executable, "-m", "dist_reshard.inspect", *args], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_summary_of_each_format(hf_models, outputs):
    code, out, _ = _inspect(hf_models["qwen3"], "--json")
    hf = json.loads(out)
    assert code == 0 and hf["format"] == "hf" and hf["family"] == "qwen3"
    assert hf["tensors"] == len(load_hf_state(hf_models["qwen3"])) and hf["dtypes"] == {"F32": hf["tensors"]}
    code, out, _ = _inspect(outputs["qwen3-torch"]["save"], "--json")
    legacy = json.loads(out)
    assert legacy["format"] == "torch" and legacy["layout"] == {"tp": 2, "pp": 2, "vpp": None}
    assert len(legacy["files"]) == 4 and legacy["logical_tensors"] == hf["tensors"]
    code, out, _ = _inspect(outputs["qwen3-torch_dist"]["save"], "--json")
    dist = json.loads(out)
    assert dist["format"] == "torch_dist" and dist["family"] == "qwen3"
    assert any(f["file"].endswith("__1_0.distcp") for f in dist["files"])
    assert dist["logical_tensors"] == hf["tensors"]


@pytest.mark.parametrize("name", ["model.layers.3.self_attn.k_proj.weight", "model.embed_tokens.weight",
                                  "model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"])
def test_logical_tensor_is_the_same_in_every_format(hf_models, outputs, name):
    stats = []
    for path in (hf_models["qwen3"], outputs["qwen3-torch"]["save"], outputs["qwen3-torch_dist"]["save"]):
        code, out, err = _inspect(path, "--tensor", name, "--json")
        assert code == 0, err
        stats.append(json.loads(out))
    assert stats[0] == stats[1] == stats[2]
    t = load_hf_state(hf_models["qwen3"])[name]
    assert stats[0]["shape"] == list(t.shape) and abs(stats[0]["max"] - t.max().item()) < 1e-7


@pytest.mark.parametrize("case", [c[0] + "-" + c[1] for c in CASES])
def test_compare_hf_with_its_conversion(hf_models, outputs, case):
    code, out, err = _inspect("compare", hf_models[outputs[case]["name"].rsplit("-", 1)[0]], outputs[case]["save"],
                              "--json")
    result = json.loads(out)
    assert code == 0 and result["differing"] == 0, err
    assert result["tensors"] == len(load_hf_state(outputs[case]["load"]))


def test_compare_catches_one_flipped_bit(hf_models, outputs, tmp_path):
    save = tmp_path / "flipped"
    shutil.copytree(outputs["llama3-torch"]["save"], save)
    rank_file = save / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    w = state["model"]["decoder.layers.2.mlp.linear_fc2.weight"]
    w.view(torch.int32)[3, 5] ^= 1  # the lowest mantissa bit of one float32
    torch.save(state, rank_file)
    code, out, _ = _inspect("compare", hf_models["llama3"], str(save), "--json")
    result = json.loads(out)
    assert code == 1 and result["differing"] == 1
    (row,) = [r for r in result["rows"] if r["status"] != "equal"]
    assert row["tensor"] == "model.layers.2.mlp.down_proj.weight" and 0 < row["max_abs_diff"] < 1e-6
