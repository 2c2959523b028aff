"""The benchmark's own tools (bench/): the checkpoint generator, the full-tensor baseline, the runner.

Fast and untimed: a few-MB source, no torchrun; timing is bench/run.py's job, not the suite's.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

import full_tensor_worker  # noqa: E402
import make_checkpoint  # noqa: E402
from dist_reshard.families import family_for  # noqa: E402
from dist_reshard.hf_config import read_config  # noqa: E402
from dist_reshard.layout import TargetLayout  # noqa: E402
from dist_reshard.rank_plan import make_plan  # noqa: E402
from dist_reshard.safetensors_index import index_folder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bench") / "llama")
    # Small shards, so the index spans several files as a real download's does.
    info = make_checkpoint.make_checkpoint(folder, size_gb=0.004, shard_gb=0.001)
    return folder, info


def _open_all(folder):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    seen, total = {}, 0
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(folder, fname), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert index["weight_map"][name] == fname
                assert torch.isfinite(t.float()).all(), name  # the generator masks the exponent's top bit
                seen[name] = (tuple(t.shape), t.dtype)
                total += t.numel() * t.element_size()
    assert set(seen) == set(index["weight_map"])
    assert total == index["metadata"]["total_size"]
    return seen


def test_generator_writes_a_checkpoint_safetensors_opens(tiny_llama):
    folder, info = tiny_llama
    seen = _open_all(folder)
    cfg = info["config"]
    assert len(info["files"]) > 1
    assert cfg["num_hidden_layers"] % 2 == 0 and cfg["torch_dtype"] == "bfloat16"
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    assert seen["model.embed_tokens.weight"] == ((v, h), torch.bfloat16)
    assert seen["lm_head.weight"] == ((v, h), torch.bfloat16)
    assert seen["model.layers.1.mlp.down_proj.weight"][0] == (h, f)
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    assert seen["model.layers.0.self_attn.k_proj.weight"][0] == (kv, h)
    assert len(seen) == 3 + 9 * cfg["num_hidden_layers"]


def test_full_size_shape_is_llama3_8b():
    # No data written: only the shape choice for a 4 GB request.
    scale, layers = make_checkpoint.choose_shape("llama", 4 * 10**9)
    cfg = make_checkpoint.scaled_config("llama", scale, layers, "bf16")
    assert (scale, cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (1, 4096, 14336, 128256)
    assert layers == 4


def test_mixtral_shape(tmp_path):
    folder = str(tmp_path / "mixtral")
    info = make_checkpoint.make_checkpoint(folder, size_gb=0.004, family="mixtral")
    seen = _open_all(folder)
    cfg = info["config"]
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 8
    assert seen["model.layers.0.block_sparse_moe.gate.weight"][0] == (8, h)
    assert seen["model.layers.0.block_sparse_moe.experts.7.w1.weight"][0] == (f, h)
    assert seen["model.layers.0.block_sparse_moe.experts.7.w2.weight"][0] == (h, f)


def test_dist_reshard_plans_every_source_byte(tiny_llama):
    folder, info = tiny_llama
    cfg = read_config(folder)
    index = index_folder(folder)
    for fmt in ("torch", "torch_dist"):
        plan = make_plan(family_for(cfg.architecture), index, cfg, TargetLayout(tp=2, pp=2, ckpt_format=fmt), 2)
        assert plan.source_bytes == info["total_size"]
        assert sum(a["bytes_read"] for a in plan.accounting()) == info["total_size"]


def test_full_tensor_baseline_slices(tiny_llama, tmp_path):
    folder, info = tiny_llama
    save = str(tmp_path / "ft")
    entry = full_tensor_worker.convert(folder, save, tp=2, pp=2, rank=0, world=1)
    assert entry["bytes_read"] == info["total_size"]  # one rank owning every file reads each tensor once
    out = os.path.join(save, "iter_0000001")
    assert sorted(os.listdir(out)) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    shard = torch.load(os.path.join(out, "mp_rank_01_001", "model_optim_rng.pt"))["model"]
    last = info["layers"] - 1
    name = f"model.layers.{last}.self_attn.o_proj.weight"
    with safe_open(os.path.join(folder, _file_of(folder, name)), framework="pt") as f:
        whole = f.get_tensor(name)
    assert torch.equal(shard[name], whole.chunk(2, dim=1)[1])
    assert "model.layers.0.self_attn.o_proj.weight" not in shard  # stage 0's layer


def _file_of(folder, name):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


def test_runner_copy_case(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--src", folder, "--cases", "copy",
                           "--reps", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "page cache kept WARM" in proc.stdout
    result = json.loads(out.read_text())
    (copy,) = result["cases"]
    assert copy["name"] == "copy" and copy["read_ratio"] == 1.0 and len(copy["walls"]) == 1
    assert os.listdir(tmp_path / "work") == []  # the case's output and the temp workdir are cleaned up
