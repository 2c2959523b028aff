"""The benchmark's own tools (bench/): the checkpoint generator, the full-tensor baseline, the runner.

Fast and untimed: a few-MB source, one N=1 torchrun job at most (gpu_check's smoke); timing is
bench/run.py's job, not the suite's.
"""

import json
import os
import shutil
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
from dist_reshard.config.hf_config import read_config  # noqa: E402
from dist_reshard.config.layout import TargetLayout  # noqa: E402
from dist_reshard.plan.planner import make_plan  # noqa: E402
from dist_reshard.formats.safetensors_index import index_folder  # noqa: E402


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


# bench/gpu_check.sh: the one-GPU check. Its GPU stages run on a GPU machine only; what it does around them
# (arguments, wheel install, source, bench/run.py, the results JSON) is tested here so GPU minutes are not
# spent on a typo.


def test_gpu_check_script_parses_and_passes_shellcheck():
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_gpu_check_cpu_smoke_end_to_end(tmp_path):
    """--cpu-smoke on a tiny source: the copy and a --loopback conversion through bench/run.py, the results
    JSON with the figures, the log, and the work folder emptied afterwards."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke", "--skip", "tests",
                           "--cases", "copy,torch_dist-loopback", "--workdir", str(work), "--out", str(out),
                           "--budget-s", "400"], env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "cpu-smoke" and result["status"] == "ok"
    stages = result["stages"]
    assert stages["env"]["cuda_available"] is False and stages["wheels"]["missing"] == []
    assert stages["source"]["tensor_bytes"] > 0 and "tests" not in stages
    figures = {f["case"]: f for f in stages["bench"]["figures"]}
    assert sorted(figures) == ["copy", "dist_reshard N=1 torch_dist loopback"]
    loop = figures["dist_reshard N=1 torch_dist loopback"]
    assert loop["read_ratio"] == 1.0 and loop["gb_s_end_to_end"] > 0 and loop["wall_over_copy"] > 0
    assert loop["peak_gpu_allocated_mib"] == [0] and "exchange" in loop["phases_s"]
    assert "bench/run.py" in (out / "gpu_check.log").read_text()
    assert os.listdir(work) == []


def test_gpu_check_installs_only_missing_wheels_without_an_index(tmp_path, monkeypatch):
    """A package that does not import is installed from the wheel folder with --no-index into a private
    folder; one that imports is left alone."""
    import base64
    import hashlib
    import zipfile

    import gpu_check

    wheels = tmp_path / "whl"
    wheels.mkdir()
    files = {"gpucheck_probe/__init__.py": b"VALUE = 42\n",
             "gpucheck_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 1.0\n",
             "gpucheck_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "gpucheck_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheels / "gpucheck_probe-1.0-py3-none-any.whl", "w") as z:
        for name, data in {**files, "gpucheck_probe-1.0.dist-info/RECORD": record.encode()}.items():
            z.writestr(name, data)
    monkeypatch.setattr(gpu_check, "WHEELS", str(wheels))
    monkeypatch.setattr(gpu_check, "NEEDED", {"gpucheck_probe": [("gpucheck-probe", "gpucheck_probe")],
                                              "json": [("json", "json")]})
    site = tmp_path / "site"
    entry = gpu_check.stage_wheels(gpu_check.Check(str(tmp_path / "out"), 120, "test"), str(site))
    assert entry["ok"] and entry["missing"] == ["gpucheck_probe"]
    assert entry["installed"] == ["gpucheck_probe-1.0-py3-none-any.whl"] and entry["no_wheel_for"] == []
    probe = subprocess.run([sys.executable, "-c", "import gpucheck_probe; print(gpucheck_probe.VALUE)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert probe.stdout.strip() == "42", probe.stderr
