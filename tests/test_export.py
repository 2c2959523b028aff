"""The way back and across: Megatron-Core -> HF (round trips reproduce every source tensor bit for bit,
and transformers loads the result with the original logits) and Megatron-Core -> Megatron-Core
resharding (equal, tensor for tensor, to a direct HF -> Megatron-Core conversion into the same layout)."""

import hashlib
import json
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import load_hf_state, run_cases
from dist_reshard.testing.tiny_models import VARIANTS

from dist_reshard.testing.tiny_models import MOE_VARIANTS as MOE  # noqa: E402
# Two Megatron layouts per family, one per format; MoE ones with expert parallelism.
ROUND_TRIPS = {v: [dict(tp=2, pp=2, format="torch"), dict(tp=1, pp=2, vpp=2, format="torch_dist")]
               for v in VARIANTS if v not in MOE}
ROUND_TRIPS.update({v: [dict(tp=2, pp=1, ep=2, format="torch"), dict(tp=1, pp=2, ep=2, format="torch_dist")]
                    for v in MOE})
# (name, variant, first layout written from HF, second layout written from the first)
RESHARDS = [
    ("llama3-tp2pp2torch-to-tp4torch_dist", "llama3", dict(tp=2, pp=2, format="torch"), dict(tp=4, pp=1, format="torch_dist")),
    ("qwen3-tp1torch_dist-to-tp2pp2torch", "qwen3", dict(tp=1, pp=1, format="torch_dist"), dict(tp=2, pp=2, format="torch")),
    ("llama3.2-tp2torch-to-pp2vpp2torch", "llama3.2", dict(tp=2, pp=1, format="torch"), dict(tp=1, pp=2, vpp=2, format="torch")),
    ("mixtral-ep4torch-to-ep2torch", "mixtral", dict(tp=1, pp=1, ep=4, format="torch"), dict(tp=1, pp=1, ep=2, format="torch")),
    ("qwen2_moe-tp2ep2torch_dist-to-tp1torch", "qwen2_moe", dict(tp=2, pp=1, ep=2, format="torch_dist"), dict(tp=1, pp=1, format="torch")),
]


def _layout_name(lay):
    return "-".join(f"{k}{v}" for k, v in lay.items())


@pytest.fixture(scope="module")
def exported(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cases, out = [], {}
    for variant, layouts in ROUND_TRIPS.items():
        for lay in layouts:
            name = f"{variant}-{_layout_name(lay)}"
            mcore, back = str(root / name), str(root / (name + "-hf"))
            cases.append(dict(lay, name=name, load=hf_models[variant], save=mcore))
            # Small shards for the legacy ones, so the index and several files are exercised.
            shard = "60KB" if lay["format"] == "torch" else "5GB"
            cases.append(dict(name=name + "-hf", src="mcore", dst="hf", load=mcore, save=back, max_shard_size=shard))
            out[name] = dict(variant=variant, hf=hf_models[variant], mcore=mcore, back=back)
    for name, variant, first, second in RESHARDS:
        a, b, direct = str(root / (name + "-a")), str(root / (name + "-b")), str(root / (name + "-direct"))
        cases.append(dict(first, name=name + "-a", load=hf_models[variant], save=a))
        cases.append(dict(second, name=name + "-b", src="mcore", load=a, save=b))
        cases.append(dict(second, name=name + "-direct", load=hf_models[variant], save=direct))
        out[name] = dict(variant=variant, resharded=b, direct=direct, format=second["format"])
    for c in cases:
        c.setdefault("tp", 1)
        c.setdefault("pp", 1)
        c.setdefault("format", "torch_dist")
    run_cases(2, cases, root)
    return out


def _tensor_hashes(folder):
    return {k: (str(v.dtype), tuple(v.shape), hashlib.sha256(v.contiguous().view(torch.uint8).numpy()).hexdigest())
            for k, v in load_hf_state(folder).items()}


ROUND_TRIP_IDS = [f"{v}-{_layout_name(lay)}" for v, lays in ROUND_TRIPS.items() for lay in lays]


@pytest.mark.parametrize("name", ROUND_TRIP_IDS)
def test_round_trip_reproduces_every_tensor(exported, name):
    case = exported[name]
    original, back = _tensor_hashes(case["hf"]), _tensor_hashes(case["back"])
    assert sorted(back) == sorted(original)
    for k in original:
        assert back[k] == original[k], k
    with open(os.path.join(case["hf"], "config.json")) as f:
        want = json.load(f)
    with open(os.path.join(case["back"], "config.json")) as f:
        got = json.load(f)
    assert got == want  # the HF config travels in the Megatron args and comes back unchanged
    files = [f for f in os.listdir(case["back"]) if f.endswith(".safetensors")]
    if len(files) > 1:
        with open(os.path.join(case["back"], "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert sorted(set(index["weight_map"].values())) == sorted(files)
        tensors = load_hf_state(case["back"])
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert files == ["model.safetensors"]


@pytest.mark.parametrize("name", ["llama3.2-tp2-pp2-formattorch", "qwen2_moe-tp2-pp1-ep2-formattorch",
                                  "mixtral-tp1-pp2-ep2-formattorch_dist"])
def test_transformers_loads_the_export_with_the_original_logits(exported, name):
    from transformers import AutoModelForCausalLM

    case = exported[name]
    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).eval()(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(case["back"], dtype=torch.float32).eval()(tokens).logits
    assert torch.equal(got, want)


def _legacy_tensors(folder):
    out = {}
    it = os.path.join(folder, "iter_0000001")
    for rank in sorted(os.listdir(it)):
        sd = torch.load(os.path.join(it, rank, "model_optim_rng.pt"), weights_only=False)
        for c, tensors in sd.items():
            if c.startswith("model"):
                out.update({f"{rank}/{c}/{k}": v for k, v in tensors.items()})
    return out


def _dist_tensors(folder, tmp_path, tag):
    flat = str(tmp_path / f"{tag}.pt")
    dcp_to_torch_save(os.path.join(folder, "iter_0000001"), flat)
    return torch.load(flat, weights_only=False)


@pytest.mark.parametrize("name", [r[0] for r in RESHARDS])
def test_reshard_equals_direct_conversion(exported, name, tmp_path):
    case = exported[name]
    if case["format"] == "torch":
        got, want = _legacy_tensors(case["resharded"]), _legacy_tensors(case["direct"])
    else:
        got, want = _dist_tensors(case["resharded"], tmp_path, "a"), _dist_tensors(case["direct"], tmp_path, "b")
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
        elif k.endswith("_extra_state") or "/shard_" in k:
            assert (got[k] is None) == (v is None), k


def _export(src, save, *flags):
    from conftest import torchrun

    torchrun(2, "-m", "dist_reshard.launch", "--src", "mcore", "--dst", "hf", "--load", src, "--save", save,
             "--quiet", *flags)


def test_config_rebuilt_from_args_when_none_is_stored(exported, tmp_path):
    """A checkpoint from another tool has no stored HF config: one is rebuilt from the Megatron args,
    and transformers loads the export with the original logits (a MoE model with dense layers and a
    shared expert, the hardest config to rebuild)."""
    import glob
    import shutil

    from transformers import AutoModelForCausalLM

    case = exported["qwen2_moe-tp2-pp1-ep2-formattorch"]
    src = str(tmp_path / "mcore")
    shutil.copytree(case["mcore"], src)
    for f in glob.glob(os.path.join(src, "iter_0000001", "*", "model_optim_rng.pt")):
        sd = torch.load(f, weights_only=False)
        del sd["args"].hf_config
        torch.save(sd, f)
    out = str(tmp_path / "hf")
    _export(src, out)
    assert _tensor_hashes(out) == _tensor_hashes(case["hf"])
    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).eval()(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
    assert torch.equal(got, want)


def test_hf_config_folder_supplies_config_and_tokenizer(exported, tmp_path):
    import shutil

    case = exported["llama3-tp2-pp2-formattorch"]
    reference = str(tmp_path / "ref")
    shutil.copytree(case["hf"], reference)
    with open(os.path.join(reference, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    with open(os.path.join(reference, "config.json")) as f:
        config = json.load(f)
    config["custom_note"] = "from the reference folder"
    with open(os.path.join(reference, "config.json"), "w") as f:
        json.dump(config, f)
    out = str(tmp_path / "hf")
    _export(case["mcore"], out, "--hf-config", reference)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == config
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["model_max_length"] == 128


@pytest.mark.parametrize("gqa,groups", [(False, 4), (True, 1)])
def test_megatron_lm_reads_num_query_groups_only_with_group_query_attention(gqa, groups):
    """Megatron-LM's --num-query-groups defaults to 1 and means something only with --group-query-attention:
    args from Megatron-LM itself, without GQA, have one key/value head per attention head."""
    from argparse import Namespace

    from dist_reshard.source.megatron_source import config_from_args

    args = Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     tensor_model_parallel_size=1, pipeline_model_parallel_size=1, padded_vocab_size=256,
                     num_query_groups=1, group_query_attention=gqa, normalization="RMSNorm", swiglu=True,
                     position_embedding_type="rope", add_bias_linear=False)
    assert config_from_args(args, "args").num_query_groups == groups
