"""Megatron-LM's legacy (pre-Megatron-Core) GPT checkpoints, both directions.

- HF -> legacy equals an independent reference (tests/reference_legacy_gpt.py) bit for bit, at TP2 x PP2
  and TP1, untied, tied (the last stage's `word_embeddings_for_head`) and with a QKV bias.
- Round trips reproduce the source bytes: HF -> legacy -> HF, and legacy -> torch_dist -> legacy; a
  Megatron-Core torch source gives the same legacy files as the HF one.
- Real Megatron-Core GPTModels load what a legacy source converts to (torch_dist, and local-spec torch
  strictly) with the HF model's logits; checkpoint_version 0 (older names too), 1.0 and 2.0 sources,
  built here by applying the old QKV orders, convert to the same tensors as the 3.0 one.
- What cannot be converted is refused by name, before anything is written.
"""

import glob
import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import load_hf_state, mcore_check, run_cases, torchrun
from dist_reshard.base.errors import ConversionError
from dist_reshard.testing.tiny_models import BASE, VARIANTS, build_model, save_model
from reference_legacy_gpt import legacy_gpt_files, to_old_qkv_order

TOLERANCE = 1e-4
# The legacy model always rotates with base 10000 (legacy_gpt.ROPE_BASE), so the tiny models use it.
MODELS = {
    "llama_gqa": ("llama3", dict(rope_theta=10000.0)),  # 8 heads in 4 groups, untied
    "qwen2": ("qwen2", dict(rope_theta=10000.0)),  # QKV bias
    "llama_tied": ("llama3.2", dict(rope_theta=10000.0)),  # tied embeddings
    "llama2": ("llama2", {}),  # no GQA: what checkpoint_version 0 / 1.0 could hold
}
LAYOUTS = {"tp2pp2": dict(tp=2, pp=2), "tp1": dict(tp=1, pp=1)}
OLD_VERSIONS = (0, 1.0, 2.0)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _rank_files(folder):
    return sorted(glob.glob(os.path.join(folder, "iter_0000001", "mp_rank_*", "model_optim_rng.pt")))


def _legacy_tensors(folder):
    """Every model tensor of a legacy checkpoint by rank folder and nested path."""
    out = {}
    for f in _rank_files(folder):
        sd = torch.load(f, weights_only=False)
        out.update({f"{os.path.basename(os.path.dirname(f))}/{k}": v for k, v in _flat(sd["model"]).items()})
    return out


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy_hf")
    out = {}
    for name, (variant, overrides) in MODELS.items():
        out[name] = save_model(build_model(variant, seed=len(name), **overrides), str(root / name))
    out["mixtral"] = save_model(build_model("mixtral", seed=1), str(root / "mixtral"))
    return out


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """Every conversion in one torchrun job (2 gloo ranks), in order, so later cases read earlier outputs."""
    root = tmp_path_factory.mktemp("legacy_gpt")
    out, cases = {}, []

    def case(name, **kw):
        out[name] = str(root / name)
        cases.append(dict(dict(tp=1, pp=1, format="torch"), **kw, save=out[name]))

    for name in ("llama_gqa", "qwen2", "llama_tied"):
        for lay, sizes in LAYOUTS.items():
            case(f"{name}-{lay}", load=models[name], dst="legacy", **sizes)
        case(f"{name}-back", src="mcore", dst="hf", load=out[f"{name}-tp2pp2"], max_shard_size="60KB")
        case(f"{name}-dist", src="mcore", load=out[f"{name}-tp2pp2"], format="torch_dist")
        case(f"{name}-again", src="mcore", dst="legacy", load=out[f"{name}-dist"], tp=2, pp=2)
    # A Megatron-Core (TE-spec torch) source written in another layout gives the same legacy files.
    case("llama_tied-mcore", load=models["llama_tied"], pp=2)
    case("llama_tied-from-mcore", src="mcore", dst="legacy", load=out["llama_tied-mcore"], tp=2, pp=2)
    case("llama2-tp2", load=models["llama2"], dst="legacy", tp=2)
    # Virtual pipeline: `model0`, `model1` containers, read back to HF.
    case("qwen2-vpp", load=models["qwen2"], dst="legacy", pp=2, vpp=2)
    case("qwen2-vpp-back", src="mcore", dst="hf", load=out["qwen2-vpp"])
    run_cases(2, cases, root)
    return out


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "llama_tied"])
@pytest.mark.parametrize("lay", LAYOUTS)
def test_hf_to_legacy_equals_reference(models, converted, name, lay):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models[name])
    want = legacy_gpt_files(load_hf_state(models[name]), config, **LAYOUTS[lay])
    files = _rank_files(converted[f"{name}-{lay}"])
    assert len(files) == len(want)
    for (r, p), model in want.items():
        rank = f"mp_rank_{r:02d}" + (f"_{p:03d}" if LAYOUTS[lay]["pp"] > 1 else "")
        sd = torch.load(os.path.join(converted[f"{name}-{lay}"], "iter_0000001", rank, "model_optim_rng.pt"),
                        weights_only=False)
        got, expected = _flat(sd["model"]), _flat(model)
        assert list(got) == list(expected), rank  # names and Megatron's own order
        for k, v in expected.items():
            assert _same(got[k], v), (rank, k)
        assert sd["checkpoint_version"] == 3.0 and sorted(sd) == ["args", "checkpoint_version", "iteration", "model"]
        args = sd["args"]
        assert (args.use_legacy_models, args.use_mcore_models, args.transformer_impl) == (True, False, "local")
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (LAYOUTS[lay]["tp"],
                                                                                        LAYOUTS[lay]["pp"])
        assert (args.position_embedding_type, args.rotary_base, args.swiglu, args.normalization) == (
            "rope", 10000.0, True, "RMSNorm")
        assert args.add_qkv_bias == (name == "qwen2") and args.untie_embeddings_and_output_weights == (
            name != "llama_tied")


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "llama_tied", "qwen2-vpp"])
def test_hf_legacy_hf_round_trip_reproduces_the_source(models, converted, name):
    original, back = load_hf_state(models[name.split("-")[0]]), load_hf_state(converted[f"{name}-back"])
    if name.endswith("vpp"):
        for f in _rank_files(converted[name]):
            sd = torch.load(f, weights_only=False)
            assert "model" not in sd and all("language_model" in sd[f"model{v}"] for v in (0, 1)), f
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert _same(back[k], v), k
    with open(os.path.join(models[name.split("-")[0]], "config.json")) as f, \
            open(os.path.join(converted[f"{name}-back"], "config.json")) as g:
        assert json.load(g) == json.load(f)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "llama_tied", "llama_tied-from-mcore"])
def test_legacy_round_trip_through_megatron_core(converted, name):
    """legacy -> torch_dist -> legacy gives the first legacy files back; so does an mcore torch source."""
    base = name.split("-")[0]
    first = _legacy_tensors(converted[f"{base}-tp2pp2"])
    again = _legacy_tensors(converted[name if "from" in name else f"{name}-again"])
    assert list(again) == list(first)
    for k, v in first.items():
        assert _same(again[k], v), k


def test_inspect_reads_a_legacy_checkpoint(models, converted):
    from dist_reshard.tools.inspect import summary
    from dist_reshard.tools.logical import open_checkpoint

    info = summary(converted["llama_tied-tp2pp2"])
    assert (info["format"], info["family"], info["layout"]) == ("legacy_gpt", "llama", {"tp": 2, "pp": 2, "vpp": None})
    ck, hf = open_checkpoint(converted["llama_tied-tp2pp2"]), load_hf_state(models["llama_tied"])
    assert sorted(ck.names()) == sorted(hf)
    assert _same(ck.tensor("model.layers.3.self_attn.k_proj.weight"), hf["model.layers.3.self_attn.k_proj.weight"])


def test_verify_checks_legacy_files_against_the_hf_source(models, converted, tmp_path):
    from dist_reshard.tools.verify import check_against, check_files

    out = converted["qwen2-tp2pp2"]
    assert check_files(out) == [] and check_against(out, models["qwen2"]) == []
    broken = str(tmp_path / "broken")
    shutil.copytree(out, broken)
    f = _rank_files(broken)[-1]
    sd = torch.load(f, weights_only=False)
    sd["model"]["language_model"]["encoder"]["layers.1.self_attention.query_key_value.bias"][3] += 1
    torch.save(sd, f)
    assert check_against(broken, models["qwen2"]) == [
        f"{f}: tensor model/decoder.layers.1.self_attention.linear_qkv.bias differs from its source slices"]


# ---------------------------------------------------------------------------------------------------
# Older checkpoint versions, and real Megatron-Core loading what legacy sources convert to.


def _older_names(key):
    """Names of the oldest legacy checkpoints (Megatron-LM still renames them on load)."""
    return key.replace("_norm.", "_layernorm.").replace("self_attention.", "attention.")


def _make_old_version(src, dst, version, tp):
    """A copy of a 3.0 legacy checkpoint (no GQA, PP 1) as Megatron-LM before 3.0 wrote it: the old QKV
    order, `model_parallel_size` args, and for version 0 no checkpoint_version and the oldest names."""
    shutil.copytree(src, dst)
    heads = None
    for f in _rank_files(dst):
        sd = torch.load(f, weights_only=False)
        heads = sd["args"].num_attention_heads // tp
        encoder = sd["model"]["language_model"].pop("encoder")
        if version < 2.0:
            encoder = {k: to_old_qkv_order(v, version, heads) if ".query_key_value." in k else v
                       for k, v in encoder.items()}
        if version == 0:
            sd["model"]["language_model"]["transformer"] = {_older_names(k): v for k, v in encoder.items()}
            del sd["checkpoint_version"]
        else:
            sd["model"]["language_model"]["encoder"] = encoder
            sd["checkpoint_version"] = version
        args = sd["args"]
        args.model_parallel_size = args.tensor_model_parallel_size
        del args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        torch.save(sd, f)
    return dst


def _as_megatron_lm_wrote_it(src, dst):
    """A copy whose args are Megatron-LM's own: no stored HF config, and for a model without grouped-query
    attention its defaults `group_query_attention=False`, `num_query_groups=1` (read only with GQA)."""
    shutil.copytree(src, dst)
    for f in _rank_files(dst):
        sd = torch.load(f, weights_only=False)
        for field in ("hf_config", "hf_architecture", "hf_model_type", "model_family"):
            delattr(sd["args"], field)
        sd["args"].num_query_groups = 1
        torch.save(sd, f)
    return dst


@pytest.fixture(scope="module")
def megatron_results(models, converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy_mcore")
    cases = [
        dict(name="gqa-dist", load=converted["llama_gqa-tp2pp2"], hf=models["llama_gqa"], format="torch_dist",
             tp=2, pp=1, load_tp=1, load_pp=2),
        dict(name="qwen2-torch", load=converted["qwen2-tp2pp2"], hf=models["qwen2"], format="torch", tp=1, pp=2),
        dict(name="tied-dist", load=converted["llama_tied-tp1"], hf=models["llama_tied"], format="torch_dist",
             tp=1, pp=2),
        dict(name="v3.0", load=converted["llama2-tp2"], hf=models["llama2"], format="torch_dist", tp=2, pp=1),
    ]
    cases.append(dict(name="megatron-lm-args", load=_as_megatron_lm_wrote_it(converted["llama2-tp2"], str(
        root / "mlm")), hf=models["llama2"], format="torch_dist", tp=1, pp=2))
    for v in OLD_VERSIONS:
        old = _make_old_version(converted["llama2-tp2"], str(root / f"old{v}"), v, tp=2)
        cases.append(dict(name=f"v{v}", load=old, hf=models["llama2"], format="torch_dist", tp=2, pp=1))
    for c in cases:
        c.update(src="mcore", save=str(root / c["name"]))
    return {r["name"]: r for r in mcore_check(2, cases, root)}


@pytest.mark.parametrize("name", ["gqa-dist", "qwen2-torch", "tied-dist", "megatron-lm-args", "v3.0"]
                         + [f"v{v}" for v in OLD_VERSIONS])
def test_megatron_core_loads_a_legacy_source_with_hf_logits(megatron_results, name):
    assert megatron_results[name]["rel_diff"] <= TOLERANCE, megatron_results[name]


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_old_checkpoint_version_converts_like_version_3(megatron_results, tmp_path, version):
    def tensors(case):
        flat = str(tmp_path / f"{case}.pt")
        dcp_to_torch_save(os.path.join(megatron_results[case]["save"], "iter_0000001"), flat)
        return {k: v for k, v in torch.load(flat, weights_only=False).items() if isinstance(v, torch.Tensor)}

    want, got = tensors("v3.0"), tensors(f"v{version}")
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert _same(got[k], v), k


# ---------------------------------------------------------------------------------------------------
# Refusals: by name, before anything is written.


def _cli_error(tmp_path, *argv):
    save = tmp_path / "out"
    proc = torchrun(2, "-m", "dist_reshard.launch", *argv, "--save", str(save), timeout=120, check=False)
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]  # one line per rank
    assert not save.exists()
    assert not any(p.name.endswith("dist_reshard-staging") for p in tmp_path.iterdir())
    return errors[0]


def test_moe_to_legacy_is_refused_through_the_cli(models, tmp_path):
    error = _cli_error(tmp_path, "--src", "hf", "--dst", "legacy", "--load", models["mixtral"], "--tp", "2")
    assert "--dst legacy: MixtralForCausalLM is a mixture of experts" in error


def _extra_bias(sd):
    sd["model"]["language_model"]["encoder"]["layers.1.mlp.dense_h_to_4h.bias"] = torch.zeros(256)
    return "tensor 'language_model/encoder/layers.1.mlp.dense_h_to_4h.bias' is not part of"


def _version_1_5(sd):
    sd["checkpoint_version"] = 1.5
    return "checkpoint_version 1.5 is not one Megatron-LM wrote (0, 1.0, 2.0 to 3.0); not supported"


@pytest.mark.parametrize("edit", [_extra_bias, _version_1_5])
def test_bad_legacy_files_are_refused_through_the_cli(converted, tmp_path, edit):
    src = str(tmp_path / "src")
    shutil.copytree(converted["llama_gqa-tp1"], src)
    f = _rank_files(src)[0]
    sd = torch.load(f, weights_only=False)
    expected = edit(sd)
    torch.save(sd, f)
    error = _cli_error(tmp_path, "--src", "mcore", "--dst", "mcore", "--load", src, "--tp", "2")
    assert f"dist_reshard: error: {f}: {expected}" in error, error


def _config_folder(tmp_path, variant, **overrides):
    """config.json of a tiny-model variant (what the --dst legacy refusals look at)."""
    import transformers

    config_cls, model_cls, extra = VARIANTS[variant]
    folder = str(tmp_path / variant)
    getattr(transformers, config_cls)(**dict(BASE, **extra, **overrides),
                                      architectures=[model_cls]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant,expected", [
    ("deepseek_v3", "DeepseekV3ForCausalLM uses multi-latent attention"),
    ("qwen3", "Qwen3ForCausalLM tensor 'model.layers.0.self_attn.q_norm.weight'"),
    ("qwen2_moe", "Qwen2MoeForCausalLM is a mixture of experts"),
    ("llama3", "rope_theta = 500000, but the legacy GPT model always rotates with base 10000"),
    ("llama3.1", "rope_theta = 500000"),
])
def test_what_the_legacy_model_cannot_express_is_refused(tmp_path, variant, expected):
    from dist_reshard.families import family_for
    from dist_reshard.config.hf_config import read_config
    from dist_reshard.families.legacy_gpt import check_target

    cfg = read_config(_config_folder(tmp_path, variant))
    with pytest.raises(ConversionError, match="^--dst legacy: ") as e:
        check_target(family_for(cfg.architecture), cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)


def _edit_legacy(converted, tmp_path, edit):
    src = str(tmp_path / "src")
    shutil.copytree(converted["llama_gqa-tp1"], src)
    for f in _rank_files(src):
        sd = torch.load(f, weights_only=False)
        edit(sd)
        torch.save(sd, f)
    return src


def _set_args(**fields):
    return lambda sd: vars(sd["args"]).update(fields)


def _position_embeddings(sd):
    sd["model"]["language_model"]["embedding"]["position_embeddings"] = {"weight": torch.zeros(256, 64)}


@pytest.mark.parametrize("edit,expected", [
    (_position_embeddings, "tensor 'language_model/embedding/position_embeddings/weight': learned absolute"),
    (lambda sd: sd.update(checkpoint_version=4.0), "checkpoint_version 4.0 is not one Megatron-LM wrote"),
    (lambda sd: sd.update(checkpoint_version=1.0), "checkpoint_version 1.0 predates grouped-query attention"),
    (_set_args(swiglu=False), "args.swiglu = False"),
    (_set_args(normalization="LayerNorm"), "args.normalization = 'LayerNorm'"),
    (_set_args(position_embedding_type="learned_absolute"), "args.position_embedding_type = 'learned_absolute'"),
    (_set_args(add_bias_linear=True), "args.add_bias_linear = True"),
])
def test_legacy_sources_outside_the_dense_families_are_refused(converted, tmp_path, edit, expected):
    from dist_reshard.source.megatron_source import open_source

    src = _edit_legacy(converted, tmp_path, edit)
    with pytest.raises(ConversionError) as e:
        open_source(src)
    assert str(e.value).startswith(_rank_files(src)[0]) and expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
