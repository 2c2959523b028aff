"""DeepSeek-V3 specifics beyond the MoE tables: an FP8 block-quantized source (dequantized by the ranks
that read it, each reading only its rows' scale blocks) and multi-token-prediction layers (dropped only
on request)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import load_hf_config, load_hf_state, run_cases, torchrun, with_extra_tensors
from reference_moe import legacy_files, torch_dist_tensors

CASES = [dict(name="fp8-tp2ep2-torch", tp=2, ep=2, format="torch"),
         dict(name="fp8-tp2-local-torch_dist", tp=2, impl="local", format="torch_dist")]


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    cases = []
    for c in CASES:
        cases.append(dict(dict(pp=1), **c, load=hf_models["deepseek_v3_fp8"], save=str(root / c["name"])))
    # FP8 -> Megatron -> HF: the bf16 tensors the FP8 ones stand for.
    cases.append(dict(name="fp8-back", src="mcore", dst="hf", tp=1, pp=1, format="torch_dist",
                      load=str(root / CASES[0]["name"]), save=str(root / "fp8-back")))
    run_cases(2, cases, root)
    return {c["name"]: c for c in cases}


def _assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.equal(actual.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), what


def test_fp8_source_legacy_equals_dequantized_reference(converted, hf_models):
    case = converted["fp8-tp2ep2-torch"]
    plain = hf_models["deepseek_v3_fp8_dequantized"]
    expected = legacy_files(load_hf_state(plain), load_hf_config(plain), 2, 1, 2, None, "transformer_engine", False)
    root = os.path.join(case["save"], "iter_0000001")
    for (r, _p, k), containers in expected.items():
        sd = torch.load(os.path.join(root, f"mp_rank_{r:02d}_{k:03d}", "model_optim_rng.pt"), weights_only=False)
        got = {n: v for n, v in sd["model"].items() if not n.endswith("._extra_state")}
        assert sorted(got) == sorted(containers["model"])
        for n, v in containers["model"].items():
            _assert_bitwise(got[n], v, n)
        assert "quantization_config" not in sd["args"].hf_config  # the weights are bf16 now
        # Never rounded by --dtype; here it is what the source stores.
        assert got["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.bfloat16


def test_fp8_source_torch_dist_local_spec(converted, hf_models, tmp_path):
    case = converted["fp8-tp2-local-torch_dist"]
    plain = hf_models["deepseek_v3_fp8_dequantized"]
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(case["save"], "iter_0000001"), flat)
    got = {k: v for k, v in torch.load(flat, weights_only=False).items() if isinstance(v, torch.Tensor)}
    expected = torch_dist_tensors(load_hf_state(plain), load_hf_config(plain), 2, "local")
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        _assert_bitwise(got[k], v, k)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_fp8_reads_only_rows_and_their_scale_blocks(converted, hf_models, name):
    case = converted[name]
    with open(case["save"] + ".report.json") as f:
        job = json.load(f)
    reads = [r["bytes_read"] for r in job["ranks"]]
    assert reads == [r["bytes_planned"] for r in job["ranks"]] and sum(reads) == job["source_bytes"]
    fp8 = load_hf_state(hf_models["deepseek_v3_fp8"])
    stored = sum(t.numel() * t.element_size() for t in fp8.values())
    # Scale rows shared by two read items are read by both: a few bytes, never whole tensors twice.
    assert stored <= job["source_bytes"] <= 1.01 * stored
    bf16 = sum(t.numel() * t.element_size() for t in load_hf_state(hf_models["deepseek_v3_fp8_dequantized"]).values())
    assert job["source_bytes"] < 0.75 * bf16  # FP8 bytes were read, not bf16 ones


def test_fp8_round_trip_gives_the_dequantized_model(converted, hf_models):
    back = load_hf_state(converted["fp8-back"]["save"])
    plain = load_hf_state(hf_models["deepseek_v3_fp8_dequantized"])
    assert sorted(back) == sorted(plain)
    for k, v in plain.items():
        _assert_bitwise(back[k], v, k)
    with open(os.path.join(converted["fp8-back"]["save"], "config.json")) as f:
        assert "quantization_config" not in json.load(f)


def test_verify_against_fp8_source(converted, hf_models):
    case = converted["fp8-tp2ep2-torch"]
    proc = subprocess.run([sys.executable, "-m", "dist_reshard.verify", case["save"], "--against",
                           hf_models["deepseek_v3_fp8"]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _with_mtp(src: str, dst: str) -> int:
    """A copy of `src` with one multi-token-prediction layer after the decoder, named as DeepSeek-V3 stores
    it (`model.layers.{L}.`: enorm, hnorm, eh_proj, shared_head, and a decoder layer's tensors)."""
    state = load_hf_state(src)
    L = load_hf_config(src).num_hidden_layers
    h = state["model.norm.weight"].shape[0]
    extra = {f"model.layers.{L}.{k[len('model.layers.1.'):]}": v.clone() for k, v in state.items()
             if k.startswith("model.layers.1.")}
    gen = torch.Generator().manual_seed(3)
    extra.update({f"model.layers.{L}.enorm.weight": torch.rand(h, generator=gen),
                  f"model.layers.{L}.hnorm.weight": torch.rand(h, generator=gen),
                  f"model.layers.{L}.eh_proj.weight": torch.rand(h, 2 * h, generator=gen),
                  f"model.layers.{L}.shared_head.norm.weight": torch.rand(h, generator=gen)})
    with_extra_tensors(src, dst, extra)
    return len(extra)


def test_mtp_layers_are_dropped_only_on_request(hf_models, tmp_path):
    load = str(tmp_path / "with_mtp")
    count = _with_mtp(hf_models["deepseek_v3"], load)
    base = ["-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", load, "--ckpt-format", "torch",
            "--tp", "2"]
    refused = torchrun(2, *base, "--save", str(tmp_path / "refused"), check=False, timeout=120)
    errors = [line for line in refused.stderr.splitlines() if "dist_reshard: error:" in line]
    assert refused.returncode != 0 and len(errors) == 2, refused.stderr[-3000:]
    assert all("multi-token-prediction" in e and "--drop-mtp" in e for e in errors)
    assert not (tmp_path / "refused").exists()
    dropped = torchrun(2, *base, "--save", str(tmp_path / "dropped"), "--drop-mtp", timeout=120)
    assert f"dropped on request (--drop-mtp): {count} multi-token-prediction tensors" in dropped.stdout + dropped.stderr
    plain = torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load",
                     hf_models["deepseek_v3"], "--ckpt-format", "torch", "--tp", "2", "--save", str(tmp_path / "plain"))
    assert plain.returncode == 0
    for r in range(2):
        rel = os.path.join("iter_0000001", f"mp_rank_{r:02d}", "model_optim_rng.pt")
        a = torch.load(tmp_path / "dropped" / rel, weights_only=False)["model"]
        b = torch.load(tmp_path / "plain" / rel, weights_only=False)["model"]
        assert sorted(a) == sorted(b)
        for k, v in b.items():
            if isinstance(v, torch.Tensor):
                _assert_bitwise(a[k], v, k)


def test_dequantize_matches_reference_on_partial_blocks():
    """Rows cut anywhere (mid-block, across blocks, a partial last block) decode like the whole tensor."""
    from fp8_reference import dequantize, quantize

    from dist_reshard.source.block_fp8 import dequantize as decode_rows
    from dist_reshard.plan.reads import read_item
    from dist_reshard.formats.safetensors_index import SourceTensor

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 45, generator=gen) * 3).to(torch.bfloat16)
    q, s = quantize(w, (8, 16))
    expected = dequantize(q, s, (8, 16))
    scale = SourceTensor("w_scale_inv", "f", "F32", tuple(s.shape), 10_000, s.numel() * 4)
    src = SourceTensor("w", "f", "BF16", (37, 45), 0, 37 * 45, encoding="fp8_block", stored_dtype="F8_E4M3",
                       scale=scale, block=(8, 16))
    for rows in [(0, 37), (3, 5), (7, 9), (8, 16), (30, 37), (0, 1)]:
        item = read_item(0, src, rows, 0)
        lo, hi = rows[0] // 8, -(-rows[1] // 8)
        assert item.aux == ("f", 10_000 + lo * s.shape[1] * 4, (hi - lo) * s.shape[1] * 4)
        raw = torch.cat([q[rows[0]:rows[1]].contiguous().view(torch.uint8).view(-1),
                         s[lo:hi].contiguous().view(torch.uint8).view(-1)])
        got = decode_rows(raw, src, rows).view(torch.bfloat16).view(rows[1] - rows[0], 45)
        _assert_bitwise(got, expected[rows[0]:rows[1]], rows)
