"""End-to-end: real torchrun jobs on gloo; every output tensor equals the reference transform bit for bit."""

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import load_hf_config, load_hf_state, run_cases
from reference import legacy_files, torch_dist_tensors

LAYOUTS = {"tp2": dict(tp=2, pp=1), "pp2": dict(tp=1, pp=2), "tp2pp2": dict(tp=2, pp=2),
           "pp2vpp2": dict(tp=1, pp=2, vpp=2)}
FORMATS = ("torch", "torch_dist")
VARIANTS = ("llama2", "llama3", "llama3.1", "llama3.2", "mistral", "qwen2", "qwen3")


def _case_name(variant, layout, fmt, impl="transformer_engine", world=2):
    return f"{variant}-{layout}-{fmt}-{impl}-n{world}"


def _cases(hf_models, root, world, variants, impls=("transformer_engine",)):
    cases = []
    for variant in variants:
        for lname, lay in LAYOUTS.items():
            for fmt in FORMATS:
                for impl in impls:
                    name = _case_name(variant, lname, fmt, impl, world)
                    cases.append(dict(lay, name=name, load=hf_models[variant], save=os.path.join(root, name),
                                      format=fmt, impl=impl, variant=variant, layout=lname))
    return cases


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """All cases run up front: 2 ranks for every family, 3 and 4 ranks (N != TxP) for two of them."""
    root = str(tmp_path_factory.mktemp("out"))
    dtype_cases = [dict(name="bf16-source-torch", load=hf_models["llama3_bf16"], format="torch", tp=2, pp=2),
                   dict(name="bf16-source-torch_dist", load=hf_models["llama3_bf16"], format="torch_dist", tp=2, pp=2),
                   dict(name="cast-bf16-torch", load=hf_models["llama3"], format="torch", tp=2, pp=1, dtype="bf16"),
                   dict(name="cast-fp16-torch_dist", load=hf_models["llama3"], format="torch_dist", tp=1, pp=2,
                        dtype="fp16"),
                   dict(name="nan-inf-torch", load=hf_models["llama3_nan"], format="torch", tp=2, pp=2),
                   dict(name="nan-inf-torch_dist", load=hf_models["llama3_nan"], format="torch_dist", tp=2, pp=2,
                        whole_chunk_bytes=0)]  # one chunk per TP rank, as Megatron writes them
    wide = [dict(name="wide-torch", load=hf_models["llama3_wide"], format="torch", tp=2, pp=2),
            dict(name="wide-torch_dist", load=hf_models["llama3_wide"], format="torch_dist", tp=2, pp=1,
                 whole_chunk_bytes=0),
            dict(name="wide-torch-hf", src="mcore", dst="hf", load=os.path.join(root, "wide-torch"),
                 max_shard_size="2MB")]
    split = [dict(name="split-chunks-torch_dist", load=hf_models["llama3"], format="torch_dist", tp=2, pp=2,
                  whole_chunk_bytes=0, max_chunk_bytes=4096),
             dict(name="split-chunks-hf", src="mcore", dst="hf", load=os.path.join(root, "split-chunks-torch_dist"))]
    dtype_cases += wide + split
    for c in dtype_cases:
        c.update(save=os.path.join(root, c["name"]), impl="transformer_engine")
    by_world = {2: _cases(hf_models, root, 2, VARIANTS) + _cases(hf_models, root, 2, ("llama3",), ("local",))
                + dtype_cases,
                3: _cases(hf_models, root, 3, ("qwen3",)),
                4: _cases(hf_models, root, 4, ("llama3.2", "qwen2"))}
    for world, cases in by_world.items():
        run_cases(world, cases, root)
    return {c["name"]: c for cases in by_world.values() for c in cases}


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.contiguous().view(torch.uint8)
    b = expected.contiguous().view(torch.uint8)
    assert torch.equal(a, b), f"{what}: values differ"


_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _source(case):
    hf = load_hf_state(case["load"])
    if case.get("dtype"):
        hf = {k: v.to(_TORCH[case["dtype"]]) for k, v in hf.items()}  # the reference casts whole tensors
    return hf


def check_legacy(case, hf=None):
    """`hf`: the HF tensors the reference starts from (default: the case's source folder's)."""
    hf = _source(case) if hf is None else hf
    config = load_hf_config(case["load"])
    expected = legacy_files(hf, config, case["tp"], case["pp"], case.get("vpp"), case["impl"])
    root = os.path.join(case["save"], "iter_0000001")
    assert sorted(os.listdir(root)) == sorted(
        f"mp_rank_{r:02d}" + (f"_{p:03d}" if case["pp"] > 1 else "") for r, p in expected)
    with open(os.path.join(case["save"], "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "1"
    for (r, p), containers in expected.items():
        name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if case["pp"] > 1 else "")
        sd = torch.load(os.path.join(root, name, "model_optim_rng.pt"), weights_only=False)
        assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1
        assert sd["args"].tensor_model_parallel_size == case["tp"]
        assert sd["args"].pipeline_model_parallel_size == case["pp"]
        assert sd["args"].true_vocab_size == config.vocab_size
        for container, tensors in containers.items():
            got = {k: v for k, v in sd[container].items() if not k.endswith("._extra_state")}
            assert sorted(got) == sorted(tensors), f"{name}/{container}: key sets differ"
            for k, v in tensors.items():
                _assert_bitwise(got[k], v, f"{name}/{container}/{k}")
            extra = [k for k in sd[container] if k.endswith("._extra_state")]
            assert all(sd[container][k] is None for k in extra)
            assert len(extra) == 4 * sum(1 for k in tensors if k.endswith("linear_fc2.weight")) + (
                "output_layer.weight" in tensors)


def check_torch_dist(case, tmp_path, hf=None):
    hf = _source(case) if hf is None else hf
    config = load_hf_config(case["load"])
    folder = os.path.join(case["save"], "iter_0000001")
    for f in ("metadata.json", "common.pt", ".metadata"):
        assert os.path.exists(os.path.join(folder, f)), f
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(folder, flat)
    got = torch.load(flat, weights_only=False)
    expected = torch_dist_tensors(hf, config, case["tp"])
    tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        _assert_bitwise(tensors[k], v, k)
    objects = [k for k in got if "/shard_" in k]
    assert len(objects) == 4 * config.num_hidden_layers
    common = torch.load(os.path.join(folder, "common.pt"), weights_only=False)
    assert common["args"].num_layers == config.num_hidden_layers and common["checkpoint_version"] == 3.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bit_exact_two_ranks(converted, variant, layout, fmt, tmp_path):
    case = converted[_case_name(variant, layout, fmt)]
    check_legacy(case) if fmt == "torch" else check_torch_dist(case, tmp_path)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_local_spec_names(converted, layout, fmt, tmp_path):
    case = converted[_case_name("llama3", layout, fmt, "local")]
    check_legacy(case) if fmt == "torch" else check_torch_dist(case, tmp_path)


@pytest.mark.parametrize("world,variant", [(3, "qwen3"), (4, "llama3.2"), (4, "qwen2")])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_world_size_differs_from_layout(converted, world, variant, layout, fmt, tmp_path):
    case = converted[_case_name(variant, layout, fmt, world=world)]
    check_legacy(case) if fmt == "torch" else check_torch_dist(case, tmp_path)


@pytest.mark.parametrize("name", ["llama3-tp2pp2-torch-transformer_engine-n2",
                                  "qwen3-tp2-torch_dist-transformer_engine-n3",
                                  "qwen2-pp2vpp2-torch-transformer_engine-n4"])
def test_each_source_byte_read_once(converted, name):
    import json

    with open(converted[name]["save"] + ".report.json") as f:
        job = json.load(f)
    reads = [r["bytes_read"] for r in job["ranks"]]
    assert reads == [r["bytes_planned"] for r in job["ranks"]]  # the reader's count equals the plan
    assert sum(reads) == job["source_bytes"]
    source = sum(os.path.getsize(os.path.join(converted[name]["load"], f))
                 for f in os.listdir(converted[name]["load"]) if f.endswith(".safetensors"))
    assert job["source_bytes"] <= source
    assert all(r > 0 for r in reads), "every rank shares the reading"


@pytest.mark.parametrize("name", ["bf16-source-torch", "bf16-source-torch_dist", "cast-bf16-torch",
                                  "cast-fp16-torch_dist", "nan-inf-torch", "nan-inf-torch_dist"])
def test_dtypes(converted, name, tmp_path):
    case = converted[name]
    check_legacy(case) if case["format"] == "torch" else check_torch_dist(case, tmp_path)


def test_row_blocks_pass_through(converted, tmp_path):
    """Row-parallel shards' row blocks are copied file to file, one splice per row: at N=2, TP2 x PP2 (each
    rank writes both TP files of its stage) every byte but the norms, which both TP files want (read once,
    copied in memory); all of them when the rows are put back together (Megatron -> HF, where each block
    lands mid-row). The files are bit for bit the reference."""
    import json

    source = load_hf_state(converted["wide-torch"]["load"])
    norms = sum(v.nbytes for k, v in source.items() if k.endswith("norm.weight"))
    for name, copied_in_memory in (("wide-torch", norms), ("wide-torch-hf", 0)):
        with open(converted[name]["save"] + ".report.json") as f:
            job = json.load(f)
        in_place = sum(r["bytes_read_in_place"] for r in job["ranks"])
        assert in_place == job["source_bytes"] - copied_in_memory, name
        assert job["read_amplification"] == 1.0
    check_legacy(converted["wide-torch"])
    check_torch_dist(converted["wide-torch_dist"], tmp_path)
    back = load_hf_state(converted["wide-torch-hf"]["save"])
    assert sorted(back) == sorted(source)
    for k, v in source.items():
        _assert_bitwise(back[k], v, k)


def test_chunks_cut_along_dim0(converted, tmp_path):
    """torch_dist chunks larger than max_chunk_bytes are cut into row ranges within each TP shard: the
    tensors are still bit for bit the reference, and the way back gives the source bytes."""
    from torch.distributed.checkpoint import FileSystemReader

    case = converted["split-chunks-torch_dist"]
    check_torch_dist(case, tmp_path)
    meta = FileSystemReader(os.path.join(case["save"], "iter_0000001")).read_metadata()
    fc1 = meta.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"]
    assert len(fc1.chunks) > 4 * 2 * 2  # more than one per layer, TP rank and gated half
    assert all(c.sizes[1] * c.sizes[2] * 4 <= 4096 for c in fc1.chunks)
    source, back = load_hf_state(case["load"]), load_hf_state(converted["split-chunks-hf"]["save"])
    assert sorted(back) == sorted(source)
    for k, v in source.items():
        _assert_bitwise(back[k], v, k)


def test_report_has_phases_rss_and_bytes(converted):
    import json

    with open(converted["llama3-tp2pp2-torch-transformer_engine-n2"]["save"] + ".report.json") as f:
        job = json.load(f)
    for r in job["ranks"]:
        assert set(r["phases"]) >= {"plan", "read", "exchange", "write"}
        assert r["peak_rss_bytes"] > 10 * 2**20 and r["bytes_written"] > 0
    assert job["read_amplification"] == 1.0
