"""Bad input through the real CLI under torchrun: a clear first line naming the culprit, on every rank,
a non-zero exit within seconds, and nothing at --save."""

import json
import os
import shutil
import struct
import time

import pytest

from conftest import torchrun


def _copy(hf_models, tmp_path, variant="llama3"):
    dst = tmp_path / "hf"
    shutil.copytree(hf_models[variant], dst)
    return dst


def _shards(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))


def _rewrite_header(path, mutate):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _truncate(folder):
    path = os.path.join(folder, _shards(folder)[0])
    os.truncate(path, os.path.getsize(path) - 100)
    return os.path.basename(path)


def _offsets_outside(folder):
    path = os.path.join(folder, _shards(folder)[1])

    def mutate(header):
        name = next(k for k in header if k != "__metadata__")
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [b + 10**9, e + 10**9]
    _rewrite_header(path, mutate)
    return os.path.basename(path)


def _missing_shard(folder):
    name = _shards(folder)[-1]
    os.remove(os.path.join(folder, name))
    return name


def _vocab_mismatch(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 1001
    with open(path, "w") as f:
        json.dump(cfg, f)
    return "model.embed_tokens.weight"


def _unsupported(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    return "unsupported architecture 'GPT2LMHeadModel'"


def _config_experts(n):
    def mutate(folder):
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["num_local_experts"] = n
        with open(path, "w") as f:
            json.dump(cfg, f)
        return (f"expert {n} exists but config.json declares {n} experts" if n < 4
                else "experts.4.w1.weight' is missing")
    return mutate


def _edit_config(**fields):
    def mutate(folder):
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        for k, v in fields.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        with open(path, "w") as f:
            json.dump(cfg, f)
    return mutate


def _fp8_without_quant_config(folder):
    _edit_config(quantization_config=None)(folder)
    return "has no quantization_config with quant_method 'fp8'"


def _fp8_scale_missing(folder):
    victim = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"][victim]
    _rewrite_header(os.path.join(folder, shard), lambda header: header.pop(victim))
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        idx = json.load(f)
    del idx["weight_map"][victim]
    with open(index, "w") as f:
        json.dump(idx, f)
    return "FP8 tensor 'model.layers.1.self_attn.kv_b_proj.weight' has no"


def _rope_not_interleaved(folder):
    _edit_config(rope_interleave=False)(folder)
    return "rope_interleave = false"


def _group_topk(folder):
    _edit_config(topk_group=2)(folder)
    return "num_experts_per_tok 2 / topk_group 2 is not 2"


CASES = {
    "heads": (None, ["--tp", "3"], "--tp 3: num_attention_heads = 8"),
    "query_groups": (None, ["--tp", "8"], "--tp 8: num_query_groups (num_key_value_heads) = 4"),
    "layers": (None, ["--pp", "3"], "--pp 3: num_hidden_layers = 4"),
    "vpp_layers": (None, ["--pp", "2", "--vpp", "4"], "--pp 2 x --vpp 4: num_hidden_layers = 4"),
    "vocab_divisor": (None, ["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by 0"),
    "vocab_shape": (_vocab_mismatch, [], None),
    "missing_shard": (_missing_shard, [], None),
    "truncated": (_truncate, [], None),
    "offsets_outside_file": (_offsets_outside, [], None),
    "unsupported_architecture": (_unsupported, [], None),
    # Mixture of experts (the tiny Mixtral has 4 experts).
    "experts_vs_ep": (None, ["--ep", "3"], "--ep 3: num_experts = 4 is not divisible", "mixtral"),
    "expert_grid": (None, ["--ep", "2", "--etp", "2", "--ckpt-format", "torch"],
                    "--etp 2 --ep 2: the expert grid (ETP x EP = 4) does not fit", "mixtral"),
    "ep_on_dense_model": (None, ["--ep", "2"], "--ep: LlamaForCausalLM has no experts", "llama3"),
    "config_fewer_experts": (_config_experts(2), [], None, "mixtral"),
    "config_more_experts": (_config_experts(8), [], None, "mixtral"),
    # DeepSeek-V3: FP8 sources must say how to decode; routing Megatron cannot express is refused.
    "fp8_without_quantization_config": (_fp8_without_quant_config, [], None, "deepseek_v3_fp8"),
    "fp8_scale_missing": (_fp8_scale_missing, [], None, "deepseek_v3_fp8"),
    "router_group_topk": (_group_topk, [], None, "deepseek_v3"),
    "rope_not_interleaved": (_rope_not_interleaved, [], None, "deepseek_v3"),
    "mla_heads_vs_tp": (None, ["--tp", "3"], "--tp 3: num_attention_heads = 8", "deepseek_v3"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_on_every_rank(hf_models, tmp_path, case):
    mutate, flags, expected, *variant = CASES[case]
    load = _copy(hf_models, tmp_path, *variant)
    if mutate:
        expected = mutate(str(load))
    save = tmp_path / "out"
    start = time.monotonic()
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", str(load),
                    "--save", str(save), *flags, timeout=120, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line per rank
    assert all(expected in e for e in errors), (expected, errors)
    assert elapsed < 60
    assert not save.exists()
    assert not any(p.name.endswith("dist_reshard-staging") for p in tmp_path.iterdir())


def test_existing_save_is_refused_without_overwrite(hf_models, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("user data")
    args = ["-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["llama3"],
            "--save", str(save), "--tp", "2"]
    proc = torchrun(2, *args, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2 and all("exists and is not empty; pass --overwrite" in e for e in errors)
    assert sorted(os.listdir(save)) == ["keep.txt"]
    torchrun(2, *args, "--overwrite", "--quiet")
    assert sorted(os.listdir(save)) == ["dist_reshard.json", "iter_0000001", "latest_checkpointed_iteration.txt"]
