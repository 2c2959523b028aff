"""The device path on ONE GPU: an NCCL process group of one rank, exchange buffers on the GPU, FP8 dequantized
there, and every byte sent through the collective (`--loopback`: a rank's own transfers too, which would
otherwise be copied locally or file to file). Each output must equal, byte for byte, the CPU (gloo) output
of the same conversion, made in the same test. Dense, MoE and FP8-MoE sources, both formats.

Needs neither Megatron-Core nor more than one GPU, so `bench/gpu_check.sh` runs it on a single-GPU machine;
the CUDA tests skip cleanly without CUDA. `test_loopback_on_one_cpu_rank` runs the loopback path on gloo
everywhere (CI), so a break in it shows up before GPU time is spent.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import torchrun, tree_hashes

# (name, source, layout): one rank writes every file of the layout, so all its transfers are to itself.
CASES = [
    ("dense-tp2pp2", "qwen3", dict(tp=2, pp=2)),
    ("moe-tp2ep2", "qwen3_moe", dict(tp=2, ep=2)),
    ("fp8-moe-tp2ep2", "deepseek_v3_fp8_nan", dict(tp=2, ep=2)),
]
FORMATS = ("torch", "torch_dist")
FP8_NAN_WEIGHT = "model.layers.1.mlp.experts.3.down_proj.weight"
FP8_INF_SCALE = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"


def _cuda_missing() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return "needs a CUDA GPU"
    return None


@pytest.fixture(scope="module")
def sources(hf_models, tmp_path_factory):
    """The suite's tiny models, plus the FP8 DeepSeek-V3 with a NaN byte in one weight and an infinite
    block scale in another: decoding must give the same bits on both devices there too."""
    folder = str(tmp_path_factory.mktemp("fp8nan") / "deepseek_v3_fp8_nan")
    shutil.copytree(hf_models["deepseek_v3_fp8"], folder)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    for name in (FP8_NAN_WEIGHT, FP8_INF_SCALE):
        path = os.path.join(folder, weight_map[name])
        state = load_file(path)
        t = state[name]
        if name == FP8_NAN_WEIGHT:
            t.view(torch.uint8)[5, 3] = 0x7F  # float8_e4m3fn's NaN
            t.view(torch.uint8)[6, 9] = 0xFF  # and its negative NaN
        else:
            t[0, 1] = float("inf")
        save_file(state, path, metadata={"format": "pt"})
    return dict(hf_models, deepseek_v3_fp8_nan=folder)


def _cases(sources, root, tag: str, **options) -> list[dict]:
    return [dict(dict(pp=1), **layout, name=name, format=fmt, load=sources[src],
                 save=os.path.join(root, tag, f"{name}-{fmt}"), **options)
            for name, src, layout in CASES for fmt in FORMATS]


def _run(cases: list[dict], root: str, job: str, gpus: str = "") -> None:
    path = os.path.join(root, f"{job}.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(1, "tests/workers/convert_many.py", path, timeout=600, gpus=gpus)


def _job(case: dict) -> dict:
    with open(case["save"] + ".report.json") as f:
        return json.load(f)


def _report(case: dict) -> dict:
    return _job(case)["ranks"][0]


def _assert_same_output(got: dict, want: dict) -> None:
    a, b = tree_hashes(got["save"]), tree_hashes(want["save"])
    assert a == b, f"{got['save']} differs from {want['save']}: " + ", ".join(
        k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


@pytest.fixture(scope="module")
def gpu_outputs(request, tmp_path_factory):
    """Two jobs: the CPU reference on gloo, then one NCCL job making the plain and the loopback outputs."""
    why = _cuda_missing()
    if why:
        pytest.skip(why)  # before the sources are built: skipping costs nothing
    sources = request.getfixturevalue("sources")
    root = str(tmp_path_factory.mktemp("single_gpu"))
    cpu = _cases(sources, root, "cpu", device="cpu")
    plain = _cases(sources, root, "cuda", device="cuda")
    loop = _cases(sources, root, "cuda_loopback", device="cuda", loopback=True)
    _run(cpu, root, "cpu")
    _run(plain + loop, root, "cuda", gpus="0")
    return {c["name"] + "-" + c["format"]: (c, p, lo) for c, p, lo in zip(cpu, plain, loop)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_one_gpu_equals_cpu(gpu_outputs, name, fmt):
    cpu, plain, loop = gpu_outputs[f"{name}-{fmt}"]
    _assert_same_output(plain, cpu)
    _assert_same_output(loop, cpu)
    # The loopback run read every byte into memory (nothing copied file to file) and sent all of it through the
    # GPU: the tiny model is one bucket, whose send and receive buffers (at least the bytes read, FP8 decoded
    # to twice its size) were on the device at once. The CPU job never touched CUDA.
    rep = _report(loop)
    assert _job(loop)["buckets"] == 1
    assert rep["bytes_read_in_place"] == 0 and rep["bytes_read"] == _report(cpu)["bytes_read"]
    assert rep["peak_gpu_bytes"] >= rep["bytes_read"] > 0 and _report(cpu)["peak_gpu_bytes"] == 0
    assert _report(plain)["peak_gpu_bytes"] > 0  # the plain NCCL run's error agreement is on the GPU too


def test_loopback_on_one_cpu_rank(sources, tmp_path):
    """--loopback on gloo (CI): a rank's own transfers through the all-to-all give the plain run's bytes."""
    root = str(tmp_path)
    picked = [c for c in _cases(sources, root, "plain", device="cpu")
              if (c["name"], c["format"]) in {("dense-tp2pp2", "torch"), ("fp8-moe-tp2ep2", "torch_dist")}]
    loop = [dict(c, loopback=True, save=c["save"].replace(os.sep + "plain" + os.sep, os.sep + "loop" + os.sep))
            for c in picked]
    _run(picked + loop, root, "cpu")
    for p, lo in zip(picked, loop):
        _assert_same_output(lo, p)
        assert _report(lo)["bytes_read_in_place"] == 0 and _report(lo)["bytes_read"] == _report(p)["bytes_read"]
        assert _job(lo)["buckets"] == 1  # what test_one_gpu_equals_cpu's GPU memory bound assumes
    assert _report(picked[0])["bytes_read_in_place"] > 0  # the plain run does copy file to file
