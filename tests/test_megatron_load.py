"""Real Megatron-Core loads the converter's output and reproduces the HF model's logits (float32).

Legacy files: strict `load_state_dict` of each rank file into a GPTModel built for that rank.
torch_dist: `dist_checkpointing.load`, also into a TP/PP/EP other than the one it was written for, with
small tensors written as whole chunks (the default) or as one chunk per TP rank (`whole_chunk_bytes=0`).
MoE models (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE with dense layers mixed in) run with
the allgather dispatcher in eval mode, as FORMATS.md section 8 describes.
"""

import json

import pytest

from conftest import torchrun

TOLERANCE = 1e-4  # max |megatron - hf| / max |hf| over the true vocabulary

TWO_RANKS = [
    # (variant, format, written layout, loaded layout)
    ("llama3", "torch", dict(tp=2, pp=1), None),
    ("llama3", "torch", dict(tp=1, pp=2), None),
    ("llama3", "torch", dict(tp=1, pp=2, vpp=2), None),
    ("llama3", "torch_dist", dict(tp=2, pp=2, whole_chunk_bytes=0), dict(load_tp=2, load_pp=1)),
    ("llama3", "torch_dist", dict(tp=2, pp=1), dict(load_tp=1, load_pp=2, load_vpp=2)),
    # Chunks cut along dim 0 within each TP shard (max_chunk_bytes), loaded at the same TP size.
    ("llama3", "torch_dist", dict(tp=2, pp=1, whole_chunk_bytes=0, max_chunk_bytes=4096), dict(load_tp=2, load_pp=1)),
    ("llama2", "torch", dict(tp=2, pp=1), None),
    ("llama3.1", "torch", dict(tp=2, pp=1), None),
    ("llama3.2", "torch", dict(tp=1, pp=2), None),
    ("llama3.2", "torch_dist", dict(tp=2, pp=1), dict(load_tp=1, load_pp=2)),
    ("mistral", "torch", dict(tp=2, pp=1), None),
    ("qwen2", "torch", dict(tp=2, pp=1), None),
    ("qwen2", "torch_dist", dict(tp=1, pp=2), dict(load_tp=2, load_pp=1)),
    ("qwen3", "torch", dict(tp=1, pp=2, vpp=2), None),
    ("qwen3", "torch_dist", dict(tp=2, pp=1), dict(load_tp=2, load_pp=1)),
    # Mixture of experts: every legacy EP rank file strict-loads; torch_dist loads into another EP.
    ("mixtral", "torch", dict(tp=1, pp=1, ep=2), None),
    ("mixtral", "torch_dist", dict(tp=1, pp=1, ep=2), dict(load_tp=2, load_pp=1, load_ep=1)),
    ("qwen2_moe", "torch", dict(tp=1, pp=1, ep=2), None),
    ("qwen2_moe", "torch_dist", dict(tp=2, pp=1), dict(load_tp=1, load_pp=1, load_ep=2)),
    ("qwen3_moe", "torch", dict(tp=1, pp=1, ep=2), None),
    ("qwen3_moe", "torch_dist", dict(tp=1, pp=1, ep=2), dict(load_tp=1, load_pp=2, load_ep=1)),
    # DeepSeek-V3: multi-latent attention, sigmoid router with expert bias, shared experts; FP8 source
    # against the HF model on the tensors it decodes to.
    ("deepseek_v3", "torch", dict(tp=1, pp=1, ep=2), None),
    ("deepseek_v3", "torch_dist", dict(tp=2, pp=1, whole_chunk_bytes=0), dict(load_tp=1, load_pp=2)),
    ("moonlight", "torch", dict(tp=2, pp=1), None),
    ("deepseek_v3_fp8", "torch", dict(tp=1, pp=2), None),
]
FOUR_RANKS = [
    ("llama3", "torch", dict(tp=2, pp=2), None),
    ("qwen3", "torch", dict(tp=2, pp=2), None),
    ("llama3.2", "torch", dict(tp=2, pp=2), None),
    ("qwen2", "torch_dist", dict(tp=1, pp=2, vpp=2), dict(load_tp=2, load_pp=2)),
    ("mixtral", "torch", dict(tp=2, pp=1, ep=2), None),
    ("qwen3_moe", "torch", dict(tp=1, pp=2, ep=2), None),
    ("qwen2_moe", "torch", dict(tp=2, pp=1, ep=2, etp=1), None),
    ("mixtral", "torch_dist", dict(tp=1, pp=1, ep=2, etp=2), dict(load_tp=2, load_pp=1, load_ep=2, load_etp=2)),
    ("qwen3_moe", "torch_dist", dict(tp=2, pp=1, ep=2, whole_chunk_bytes=0, max_chunk_bytes=2048),
     dict(load_tp=1, load_pp=2, load_ep=2)),
    ("qwen2_moe", "torch_dist", dict(tp=1, pp=1, ep=4), dict(load_tp=2, load_pp=1, load_ep=2)),
    ("deepseek_v3", "torch", dict(tp=2, pp=2, ep=2, etp=1), None),
]


# Megatron -> Megatron: (variant, first layout from HF, second layout from the first); each output loads.
RESHARDS = {
    2: [("llama3", dict(tp=2, pp=1, format="torch"), dict(tp=1, pp=2, format="torch")),
        ("qwen2_moe", dict(tp=1, pp=1, ep=2, format="torch_dist"), dict(tp=2, pp=1, format="torch"))],
    4: [("mixtral", dict(tp=1, pp=1, ep=4, format="torch"), dict(tp=2, pp=1, ep=2, format="torch")),
        ("qwen3", dict(tp=1, pp=1, format="torch"), dict(tp=2, pp=2, format="torch_dist"))],
}


def _reshard_name(variant, first, second):
    return f"{variant}-{_name_layout(first)}-then-{_name_layout(second)}"


def _name_layout(lay):
    return "-".join(f"{k}{v}" for k, v in lay.items())


def _name(variant, fmt, written, loaded):
    w = "-".join(f"{k}{v}" for k, v in written.items())
    return f"{variant}-{fmt}-{w}" + ("-as-" + "-".join(f"{k}{v}" for k, v in loaded.items()) if loaded else "")


@pytest.fixture(scope="module")
def megatron_results(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    results = {}
    for world, table in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        cases = []
        for variant, fmt, written, loaded in table:
            name = _name(variant, fmt, written, loaded)
            cases.append(dict(written, **(loaded or {}), name=name, load=hf_models[variant],
                              hf=hf_models.get(variant + "_dequantized", hf_models[variant]),
                              save=str(root / name), format=fmt, impl="local"))
        for variant, first, second in RESHARDS[world]:
            name = _reshard_name(variant, first, second)
            cases.append(dict(first, name=name + "-first", load=hf_models[variant], save=str(root / (name + "-a")),
                              impl="local"))
            cases.append(dict(second, name=name, src="mcore", load=str(root / (name + "-a")), hf=hf_models[variant],
                              save=str(root / name), impl="local"))
        path, out = str(root / f"cases{world}.json"), str(root / f"results{world}.json")
        with open(path, "w") as f:
            json.dump(cases, f)
        torchrun(world, "tests/workers/mcore_check.py", path, out, timeout=900)
        with open(out) as f:
            results.update({r["name"]: r for r in json.load(f)})
    return results


@pytest.mark.parametrize("variant,fmt,written,loaded", TWO_RANKS + FOUR_RANKS,
                         ids=[_name(*c) for c in TWO_RANKS + FOUR_RANKS])
def test_megatron_logits_match_hf(megatron_results, variant, fmt, written, loaded):
    result = megatron_results[_name(variant, fmt, written, loaded)]
    assert result["rel_diff"] <= TOLERANCE, result


@pytest.mark.parametrize("variant,first,second", RESHARDS[2] + RESHARDS[4],
                         ids=[_reshard_name(*c) for c in RESHARDS[2] + RESHARDS[4]])
def test_resharded_megatron_checkpoint_loads_with_hf_logits(megatron_results, variant, first, second):
    for name in (_reshard_name(variant, first, second) + "-first", _reshard_name(variant, first, second)):
        assert megatron_results[name]["rel_diff"] <= TOLERANCE, megatron_results[name]
