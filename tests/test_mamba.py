"""Mamba hybrids (Megatron-Core MambaModel) against transformers' Nemotron-H and Mamba-2.

One torchrun job (2 gloo ranks) runs every conversion: HF -> Megatron (legacy TP2xPP2, torch_dist TP2,
legacy TP2), Megatron -> HF, and Megatron -> Megatron resharding. The outputs are compared bit for bit with
tests/reference_mamba.py, round trips with the source bytes, and a second job loads them into Megatron-Core's
real MambaModel (built on CPU, tests/mamba_cpu.py): strict `load_state_dict` of legacy files and
`dist_checkpointing.load` of torch_dist folders at TP2 and at PP2, each compared with the legacy shard
of the same layout. Logits: the round-tripped HF model against the original (Megatron's Mamba kernels are
CUDA-only; tests/multigpu/test_mamba_gpu.py compares Megatron's logits on a GPU).
"""

import json
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import load_hf_config, load_hf_state, run_cases, torchrun
from dist_reshard.base.errors import ConversionError
from dist_reshard.families import family_for
from dist_reshard.config.hf_config import config_from_dict, read_config
from dist_reshard.config.layout import TargetLayout
from dist_reshard.plan.planner import make_plan
from dist_reshard.testing.tiny_models import HYBRID_VARIANTS, build_model, save_model
from dist_reshard.tools.verify import check_against
from reference_mamba import legacy_files, torch_dist_tensors
from reference_mamba import pattern as hybrid_pattern

# torch_dist "tp2": one chunk per TP rank and section (whole_chunk_bytes 0), as Megatron itself writes them;
# "whole": each tensor one chunk (the default for tensors this small).
LAYOUTS = {"tp2pp2-torch": dict(tp=2, pp=2, format="torch"),
           "tp2-torch_dist": dict(tp=2, pp=1, format="torch_dist", whole_chunk_bytes=0),
           "whole-torch_dist": dict(tp=2, pp=1, format="torch_dist"),
           "tp2-torch": dict(tp=2, pp=1, format="torch"),
           # Uneven: MambaStack takes --decoder-first-pipeline-num-layers (num_layers_in_first_pipeline_stage).
           "pp2-first2-torch": dict(tp=1, pp=2, format="torch", first=2)}
# (name, source layout name, target layout): Megatron -> Megatron
RESHARDS = {"tp2pp2-torch-to-tp1-torch_dist": ("tp2pp2-torch", dict(tp=1, pp=1, format="torch_dist")),
            "tp2-torch_dist-to-pp2-torch": ("tp2-torch_dist", dict(tp=1, pp=2, format="torch")),
            "tp1-torch_dist-to-tp2pp2-torch": ("tp2pp2-torch-to-tp1-torch_dist", dict(tp=2, pp=2, format="torch"))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mamba")
    out, cases = {}, []
    for variant in HYBRID_VARIANTS:
        hf = str(root / variant)
        save_model(build_model(variant, seed=sum(map(ord, variant))), hf)
        out[variant] = hf
        for name, lay in LAYOUTS.items():
            save = str(root / f"{variant}-{name}")
            cases.append(dict(lay, load=hf, save=save))
            cases.append(dict(src="mcore", dst="hf", load=save, save=save + "-hf", max_shard_size="40KB"))
            out[f"{variant}-{name}"] = save
        for name, (src, lay) in RESHARDS.items():
            save = str(root / f"{variant}-{name}")
            cases.append(dict(lay, src="mcore", load=out[f"{variant}-{src}"], save=save))
            out[f"{variant}-{name}"] = save
    cases += _gpt_hybrid_cases(root, out)
    for variant in HYBRID_VARIANTS:  # a checkpoint another tool wrote: Megatron-LM's args only
        foreign = _foreign_checkpoint(root, out[variant])
        out[f"{variant}-foreign"] = foreign
        cases.append(dict(src="mcore", dst="hf", load=foreign, save=foreign + "-hf", vocab_size=1000))
    run_cases(2, cases, root)
    return out


def _foreign_checkpoint(root, hf_folder) -> str:
    """Legacy TP2 rank files as another converter would write them (the reference tensors, `_extra_state`
    None), with only Megatron-LM's own args: no HF config, architecture or true vocabulary size."""
    from argparse import Namespace

    hf, config = load_hf_state(hf_folder), load_hf_config(hf_folder)
    mamba2 = config.model_type == "mamba2"
    heads = config.num_heads if mamba2 else config.mamba_num_heads
    args = Namespace(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=4 * config.hidden_size if mamba2 else config.intermediate_size,
        num_attention_heads=heads if mamba2 else config.num_attention_heads,
        num_query_groups=None if mamba2 else config.num_key_value_heads, kv_channels=None if mamba2 else config.head_dim,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1, padded_vocab_size=1024,
        make_vocab_size_divisible_by=128, untie_embeddings_and_output_weights=True, norm_epsilon=1e-5,
        is_hybrid_model=True, hybrid_override_pattern=hybrid_pattern(config), mamba_state_dim=config.state_size if mamba2
        else config.ssm_state_size, mamba_head_dim=config.head_dim if mamba2 else config.mamba_head_dim,
        mamba_num_groups=config.n_groups, mamba_num_heads=heads, squared_relu=not mamba2, swiglu=False,
        position_embedding_type="none", normalization="RMSNorm", add_bias_linear=False, group_query_attention=not mamba2)
    folder = os.path.join(str(root), f"foreign-{config.model_type}")
    for (r, _p), sd in legacy_files(hf, config, 2, 1).items():
        model = {k: v.contiguous().clone() for k, v in sd.items()}  # views would save the whole storage
        model.update({k.rsplit(".", 1)[0] + "._extra_state": None for k in sd if k.endswith("proj.weight")
                      or k.endswith(("linear_qkv.weight", "linear_fc1.weight", "linear_fc2.weight"))})
        os.makedirs(os.path.join(folder, "iter_0000001", f"mp_rank_{r:02d}"))
        torch.save(dict(model=model, args=args, checkpoint_version=3.0, iteration=1),
                   os.path.join(folder, "iter_0000001", f"mp_rank_{r:02d}", "model_optim_rng.pt"))
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    return folder


# GPT <-> hybrid layer patterns (`--layer-pattern`): Llama 3 laid out as attention and MLP layers, back to HF
# and to GPTModel; a Qwen2 (qkv bias) torch_dist GPT checkpoint laid out as a hybrid by a Megatron -> Megatron run.
GPT_PATTERNS = {"llama3": "*-*-*-*-"}


def _gpt_hybrid_cases(root, out):
    cases = []
    for variant in ("llama3", "qwen2"):
        out[variant] = str(root / variant)
        save_model(build_model(variant, seed=sum(map(ord, variant))), out[variant])
    gh = lambda name: out.setdefault(f"gpt-{name}", str(root / f"gpt-{name}"))  # noqa: E731
    cases += [
        dict(load=out["llama3"], save=gh("llama3-tp2pp2-torch"), tp=2, pp=2, format="torch",
             layer_pattern=GPT_PATTERNS["llama3"]),
        dict(load=out["llama3"], save=gh("llama3-tp2-torch_dist"), tp=2, pp=1, format="torch_dist",
             layer_pattern=GPT_PATTERNS["llama3"]),
        dict(load=out["llama3"], save=gh("llama3-pp2-first2-torch"), tp=1, pp=2, format="torch", first=2,
             layer_pattern=GPT_PATTERNS["llama3"]),
        dict(src="mcore", dst="hf", load=gh("llama3-tp2pp2-torch"), save=gh("llama3-tp2pp2-torch-hf")),
        dict(src="mcore", load=gh("llama3-tp2-torch_dist"), save=gh("llama3-back-to-gpt-pp2-torch"), tp=1, pp=2,
             format="torch", layer_pattern="gpt"),
        dict(load=out["qwen2"], save=gh("qwen2-gpt-tp2-torch_dist"), tp=2, pp=1, format="torch_dist"),
        dict(src="mcore", load=gh("qwen2-gpt-tp2-torch_dist"), save=gh("qwen2-tp2-torch"), tp=2, pp=1, format="torch",
             layer_pattern="*-*-*-*-"),
    ]
    return cases


def _assert_bitwise(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.equal(actual.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), what


def _check_legacy(folder, hf_folder, tp, pp, first_stage=None):
    hf, config = load_hf_state(hf_folder), load_hf_config(hf_folder)
    expected = legacy_files(hf, config, tp, pp, first_stage)
    for (r, p), want in expected.items():
        name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
        sd = torch.load(os.path.join(folder, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)
        got = {k: v for k, v in sd["model"].items() if not k.endswith("._extra_state")}
        assert sorted(got) == sorted(want), name
        for k in want:
            _assert_bitwise(got[k], want[k], f"{name}/{k}")
        extra = sorted(k for k in sd["model"] if k.endswith("._extra_state"))
        owners = [k for k in want if k.endswith(("in_proj.weight", "out_proj.weight", "linear_qkv.weight",
                                                 "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
                                                 "output_layer.weight"))]
        assert extra == sorted(k.rsplit(".", 1)[0] + "._extra_state" for k in owners)
        assert sd["args"].hybrid_override_pattern and sd["args"].is_hybrid_model


def _check_torch_dist(folder, hf_folder, tp, tmp_path):
    hf, config = load_hf_state(hf_folder), load_hf_config(hf_folder)
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(folder, "iter_0000001"), flat)
    got = torch.load(flat, weights_only=False)
    expected = torch_dist_tensors(hf, config, tp)
    tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        _assert_bitwise(tensors[k], v, k)
    # One extra-state object per linear module of each layer, and MambaModel's output layer.
    # (every layer kind has two linear modules: in_proj/out_proj, linear_qkv/linear_proj, linear_fc1/linear_fc2).
    assert sum("/shard_" in k for k in got) == 2 * config.num_hidden_layers + 1


@pytest.mark.parametrize("variant", list(HYBRID_VARIANTS))
def test_bit_exact_against_reference(converted, variant, tmp_path):
    hf = converted[variant]
    _check_legacy(converted[f"{variant}-tp2pp2-torch"], hf, 2, 2)
    _check_legacy(converted[f"{variant}-tp2-torch"], hf, 2, 1)
    _check_legacy(converted[f"{variant}-pp2-first2-torch"], hf, 1, 2, first_stage=2)
    _check_torch_dist(converted[f"{variant}-tp2-torch_dist"], hf, 2, tmp_path)
    _check_torch_dist(converted[f"{variant}-whole-torch_dist"], hf, 2, tmp_path)
    # Megatron -> Megatron: TP2xPP2 legacy -> TP1 torch_dist -> TP2xPP2 legacy again, torch_dist TP2 -> PP2.
    _check_torch_dist(converted[f"{variant}-tp2pp2-torch-to-tp1-torch_dist"], hf, 1, tmp_path)
    _check_legacy(converted[f"{variant}-tp1-torch_dist-to-tp2pp2-torch"], hf, 2, 2)
    _check_legacy(converted[f"{variant}-tp2-torch_dist-to-pp2-torch"], hf, 1, 2)
    # dist_reshard.tools.verify agrees, slice by slice.
    for name in ("tp2pp2-torch", "tp2-torch_dist"):
        assert check_against(converted[f"{variant}-{name}"], hf) == []


@pytest.mark.parametrize("variant", list(HYBRID_VARIANTS))
def test_round_trip_to_hf_reproduces_bytes_and_logits(converted, variant):
    from transformers import AutoModelForCausalLM

    original = load_hf_state(converted[variant])
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(converted[variant], dtype=torch.float32)(tokens).logits
    for name in LAYOUTS:
        back = converted[f"{variant}-{name}"] + "-hf"
        got = load_hf_state(back)
        assert sorted(got) == sorted(original)
        for k in original:
            _assert_bitwise(got[k], original[k], k)
        with open(os.path.join(converted[variant], "config.json")) as f, \
                open(os.path.join(back, "config.json")) as g:
            assert json.load(f) == json.load(g)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(tokens).logits
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def mamba_loads(converted, tmp_path_factory):
    """One torchrun job loading outputs into Megatron-Core's MambaModel on CPU: {case tag: per-rank results}."""
    cases = []
    for v in HYBRID_VARIANTS:
        cases += [
            dict(tag=v, convert=False, save=converted[f"{v}-tp2-torch"], format="torch", tp=2, pp=1),
            dict(tag=v, convert=False, save=converted[f"{v}-tp2-torch_dist-to-pp2-torch"], format="torch", tp=1, pp=2),
            dict(tag=v, convert=False, save=converted[f"{v}-pp2-first2-torch"], format="torch", tp=1, pp=2),
            # torch_dist written even, loaded into the uneven split: the uneven legacy files' tensors exactly
            dict(tag=v, convert=False, save=converted[f"{v}-tp2-torch_dist"], format="torch_dist", tp=2, pp=1,
                 load_tp=1, load_pp=2, load_first=2, legacy=converted[f"{v}-pp2-first2-torch"]),
            dict(tag=v, convert=False, save=converted[f"{v}-tp2-torch_dist"], format="torch_dist", tp=2, pp=1,
                 legacy=converted[f"{v}-tp2-torch"]),
            dict(tag=v, convert=False, save=converted[f"{v}-tp2-torch_dist"], format="torch_dist", tp=2, pp=1,
                 load_tp=1, load_pp=2, legacy=converted[f"{v}-tp2-torch_dist-to-pp2-torch"]),
            dict(tag=v, convert=False, save=converted[f"{v}-whole-torch_dist"], format="torch_dist", tp=2, pp=1,
                 legacy=converted[f"{v}-tp2-torch"]),
            dict(tag=v, convert=False, save=converted[f"{v}-tp2pp2-torch-to-tp1-torch_dist"], format="torch_dist",
                 tp=1, pp=1, load_tp=2, load_pp=1, legacy=converted[f"{v}-tp2-torch"]),
        ]
    # GPT models laid out as MambaModels have no mamba layers, so these also run forward (logits vs HF).
    cases += [dict(tag="gpt", convert=False, save=converted["gpt-llama3-tp2-torch_dist"], format="torch_dist", tp=2,
                   pp=1, hf=converted["llama3"]),
              dict(tag="gpt", convert=False, save=converted["gpt-llama3-tp2-torch_dist"], format="torch_dist", tp=2,
                   pp=1, load_tp=1, load_pp=2, hf=converted["llama3"]),
              # uneven (2 | 6 of the pattern's 8 layers): written so, and torch_dist written even loaded so
              dict(tag="gpt", convert=False, save=converted["gpt-llama3-pp2-first2-torch"], format="torch", tp=1,
                   pp=2, hf=converted["llama3"]),
              dict(tag="gpt", convert=False, save=converted["gpt-llama3-tp2-torch_dist"], format="torch_dist", tp=2,
                   pp=1, load_tp=1, load_pp=2, load_first=2, hf=converted["llama3"],
                   legacy=converted["gpt-llama3-pp2-first2-torch"]),
              dict(tag="gpt", convert=False, save=converted["gpt-qwen2-tp2-torch"], format="torch", tp=2, pp=1,
                   hf=converted["qwen2"])]
    root = tmp_path_factory.mktemp("mamba_loads")
    path, out = str(root / "cases.json"), str(root / "out.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(2, "tests/workers/mamba_check.py", path, out, timeout=600)
    with open(out) as f:
        results = json.load(f)
    assert len(results) == 2 * len(cases)
    by_tag = {}
    for r in results:
        by_tag.setdefault(r["tag"], []).append(r)
    return by_tag


@pytest.mark.parametrize("variant", list(HYBRID_VARIANTS))
def test_megatron_mamba_model_loads(mamba_loads, variant):
    """Megatron-Core's MambaModel (real MambaStack and MambaMixer) takes every converted tensor: strict loads of
    legacy files, dist_checkpointing loads of torch_dist at TP2 and PP2, equal to the legacy shards."""
    assert len(mamba_loads[variant]) == 16
    for r in mamba_loads[variant]:
        assert r["differ"] == [], (r["save"], r["rank"], r["differ"][:5])
        assert any(".mixer.in_proj.weight" in k for k in r["keys"]), r["save"]


# ---------------------------------------------------------------------------------------------------
# Refusals: by name, before anything is planned or written.

_NEMOTRON = dict(architectures=["NemotronHForCausalLM"], model_type="nemotron_h", hidden_size=64, vocab_size=1000,
                 intermediate_size=96, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                 hybrid_override_pattern="M*-M-*", ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16,
                 n_groups=2, mlp_hidden_act="relu2")


def _plan(raw, **layout):
    cfg = config_from_dict(raw)
    return make_plan(family_for(cfg.architecture), {}, cfg, TargetLayout(**layout), 2)


@pytest.mark.parametrize("raw, layout, message", [
    (_NEMOTRON, dict(tp=4), "--tp 4: the mamba groups (n_groups: B and C are split by whole groups) = 2"),
    (_NEMOTRON, dict(pp=2, vpp=3), "--vpp 3: Megatron-Core's MambaModel has no virtual pipeline stages"),
    (_NEMOTRON, dict(transformer_impl="local"), "--transformer-impl local: Megatron-Core's MambaModel has only"),
    (_NEMOTRON, dict(pp=4), "--pp 4: num_hidden_layers = 6 is not divisible into 4 equal pipeline chunks"),
    (_NEMOTRON, dict(pp=2, embedding_in_split=True), "--account-for-embedding-in-pipeline-split: not supported for "
     "Megatron-Core's MambaModel, whose MambaStack splits its layers by --decoder-first/last-pipeline-num-layers"),
    (_NEMOTRON, dict(pp=2, stage_layout="E*-M|-M*L"), "not supported for Megatron-Core's MambaModel"),
    (dict(_NEMOTRON, hybrid_override_pattern="M*E-"), {}, "layer 2 is a mixture-of-experts layer ('E'"),
    (dict(_NEMOTRON, hybrid_override_pattern="M*X-"), {}, "hybrid layer symbol 'X' is not one of"),
    (dict(_NEMOTRON, mlp_hidden_act="silu"), {}, "mlp_hidden_act 'silu': only relu2 (Megatron's squared_relu)"),
    (dict(_NEMOTRON, mamba_proj_bias=True), {}, "mamba_proj_bias = true"),
    (dict(_NEMOTRON, mamba_conv_bias=False), {}, "use_conv_bias = false: Megatron-Core's Mamba mixer always has"),
    (dict(_NEMOTRON, n_groups=3), {}, "mamba heads 8 are not divisible into n_groups 3"),
    (dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", hidden_size=64, vocab_size=1000,
          num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16, n_groups=2, expand=2), {},
     "num_heads 8 x head_dim 8 is not expand x hidden_size"),
])
def test_refused_by_name(raw, layout, message):
    with pytest.raises(ConversionError) as e:
        _plan(raw, **layout)
    assert message in str(e.value).splitlines()[0]


def test_megatron_source_with_other_d_shape_is_refused(converted, tmp_path):
    """A Megatron checkpoint whose mixer D is per channel (D_has_hdim) is named, not misread."""
    from dist_reshard.source.megatron_source import open_source

    src = converted["mamba2-tp2-torch"]
    dst = tmp_path / "d_has_hdim"
    import shutil

    shutil.copytree(src, dst)
    path = dst / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(path, weights_only=False)
    sd["model"]["decoder.layers.0.mixer.D"] = torch.ones(64)
    torch.save(sd, path)
    with pytest.raises(ConversionError, match="mixer.D' has shape \\[64\\], but the checkpoint's args imply \\[4\\]"):
        open_source(str(dst))


def test_hf_config_reads_both_pattern_forms(converted):
    cfg = read_config(converted["nemotron_h"])
    assert cfg.layer_kinds == tuple("M*-M-*") and cfg.num_layers == 6 and cfg.squared_relu
    assert config_from_dict(dict(_NEMOTRON)).layer_kinds == tuple("M*-M-*")
    # Older Nemotron-H configs: `mamba_*` aliases transformers still accepts, head_dim defaulting to 128.
    old = {k: v for k, v in _NEMOTRON.items() if k not in ("n_groups", "head_dim")}
    cfg = config_from_dict(dict(old, mamba_n_groups=4, mamba_d_conv=3))
    assert (cfg.mamba_num_groups, cfg.mamba_conv_kernel, cfg.kv_channels) == (4, 3, 128)
    m2 = read_config(converted["mamba2"])
    assert m2.layer_kinds == ("M",) * 4 and m2.mamba_num_groups == 2 and m2.mamba_d_inner == 128


def test_hf_config_preflight_reads_the_pattern_form(converted):
    """--hf-config of a Nemotron-H conversion: transformers 5 saves no num_hidden_layers, only the pattern;
    the preflight counts the pattern's layers (and would name a layer-count difference). No MoE args come from
    the config's MoE defaults when no layer is MoE."""
    from dist_reshard.source.megatron_source import open_source

    reference = read_config(converted["nemotron_h"])
    assert "num_hidden_layers" not in json.load(open(os.path.join(converted["nemotron_h"], "config.json")))
    assert reference.num_experts == 0
    for layout in LAYOUTS:
        source = open_source(converted[f"nemotron_h-{layout}"], reference=reference)
        assert source.config.layer_kinds == tuple("M*-M-*") and not getattr(source.args, "num_experts", None)
    raw = json.load(open(os.path.join(converted["nemotron_h"], "config.json")))
    shorter = config_from_dict(dict(raw, layers_block_type=raw["layers_block_type"][:4]))
    with pytest.raises(ConversionError, match="--hf-config: num_layers = 4 in the HF config but 6"):
        open_source(converted[f"nemotron_h-{next(iter(LAYOUTS))}"], reference=shorter)


# ---------------------------------------------------------------------------------------------------
# GPT <-> hybrid layer patterns.

def test_gpt_as_hybrid_bit_exact(converted, tmp_path):
    from reference import legacy_files as gpt_legacy_files
    from reference_mamba import gpt_as_hybrid_files, gpt_as_hybrid_torch_dist

    for variant, name, tp, pp, pattern in (("llama3", "llama3-tp2pp2-torch", 2, 2, GPT_PATTERNS["llama3"]),
                                           ("qwen2", "qwen2-tp2-torch", 2, 1, "*-*-*-*-")):
        hf, config = load_hf_state(converted[variant]), load_hf_config(converted[variant])
        for (r, p), want in gpt_as_hybrid_files(hf, config, tp, pp, pattern).items():
            rank = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
            sd = torch.load(os.path.join(converted[f"gpt-{name}"], "iter_0000001", rank, "model_optim_rng.pt"),
                            weights_only=False)
            got = {k: v for k, v in sd["model"].items() if not k.endswith("._extra_state")}
            assert sorted(got) == sorted(want), rank
            for k in want:
                _assert_bitwise(got[k], want[k], f"{name}/{rank}/{k}")
            assert sd["args"].hybrid_override_pattern == pattern and sd["args"].num_layers == len(pattern)
            assert sd["args"].swiglu and sd["args"].position_embedding_type == "rope"
    hf, config = load_hf_state(converted["llama3"]), load_hf_config(converted["llama3"])
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(converted["gpt-llama3-tp2-torch_dist"], "iter_0000001"), flat)
    got = {k: v for k, v in torch.load(flat, weights_only=False).items() if isinstance(v, torch.Tensor)}
    want = gpt_as_hybrid_torch_dist(hf, config, 2, GPT_PATTERNS["llama3"])
    assert sorted(got) == sorted(want)
    for k in want:
        _assert_bitwise(got[k], want[k], k)
    # ... and back to GPTModel's layers: the GPT reference.
    for (r, p), containers in gpt_legacy_files(hf, config, 1, 2, None, "transformer_engine").items():
        sd = torch.load(os.path.join(converted["gpt-llama3-back-to-gpt-pp2-torch"], "iter_0000001",
                                     f"mp_rank_{r:02d}_{p:03d}", "model_optim_rng.pt"), weights_only=False)
        got = {k: v for k, v in sd["model"].items() if not k.endswith("._extra_state")}
        assert sorted(got) == sorted(containers["model"])
        for k, v in containers["model"].items():
            _assert_bitwise(got[k], v, k)
        assert not getattr(sd["args"], "hybrid_override_pattern", None) and sd["args"].num_layers == 4
    for name in ("llama3-tp2pp2-torch", "llama3-tp2-torch_dist"):  # verify re-plans with the stored pattern
        assert check_against(converted[f"gpt-{name}"], converted["llama3"]) == []
    back = load_hf_state(converted["gpt-llama3-tp2pp2-torch-hf"])
    assert sorted(back) == sorted(hf)
    for k in hf:
        _assert_bitwise(back[k], hf[k], k)


def test_gpt_as_hybrid_runs_in_megatron_mamba_model(mamba_loads):
    """Without mamba layers MambaModel runs forward on CPU: its logits equal the HF model's."""
    assert len(mamba_loads["gpt"]) == 10
    for r in mamba_loads["gpt"]:
        assert r["rel_diff"] is not None and r["rel_diff"] <= 1e-4, (r["save"], r["rel_diff"])


_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=1000)


@pytest.mark.parametrize("raw, pattern, message", [
    (_LLAMA, "M*-*-", "--layer-pattern M*-*-: symbol 'M': a GPT model has only attention (*) and MLP (-) layers"),
    (_LLAMA, "*-*", "--layer-pattern *-*: the 2-layer GPT model is attention then MLP in every layer"),
    (_LLAMA, "**--", "the pattern must be '*-' x 2 (*-*-); another order would change what the model computes"),
    (dict(_LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3"), "*-*-",
     "--layer-pattern: qwen3 has q/k layernorms, which the attention layers of Megatron-Core's MambaModel"),
    (_NEMOTRON, "*-*-", "--layer-pattern *-*-: the source is a NemotronHForCausalLM Mamba hybrid"),
    (dict(_LLAMA, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4), "*-*-",
     "has experts or multi-latent attention"),
])
def test_layer_pattern_refused_by_name(raw, pattern, message):
    from dist_reshard.families.gpt_hybrid import relayout

    cfg = config_from_dict(raw)
    with pytest.raises(ConversionError) as e:
        relayout(cfg, family_for(cfg.architecture), pattern)
    assert message in str(e.value).splitlines()[0]


@pytest.mark.parametrize("variant, flags, expected", [
    ("nemotron_h", ["--tp", "4"], "--tp 4: the mamba groups (n_groups: B and C are split by whole groups) = 2"),
    ("llama3", ["--layer-pattern", "M*-*-*-*-"], "symbol 'M': a GPT model has only attention (*) and MLP (-)"),
])
def test_cli_refuses_by_name(converted, tmp_path, variant, flags, expected):
    """Through the real CLI: the same first line on every rank, a non-zero exit, nothing at --save."""
    save = tmp_path / "out"
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", converted[variant],
                    "--save", str(save), *flags, timeout=120, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2 and all(expected in e for e in errors), (expected, proc.stderr[-2000:])
    assert not save.exists()


@pytest.mark.parametrize("variant", list(HYBRID_VARIANTS))
def test_foreign_megatron_checkpoint_recognised_from_its_args(converted, variant):
    """A MambaModel checkpoint with Megatron-LM's args alone (hybrid_override_pattern, mamba_*) is read as the
    right family; the HF model rebuilt from it (the true vocabulary, which the args do not record, from
    --vocab-size) gives the original tensors and logits."""
    from transformers import AutoModelForCausalLM

    back = converted[f"{variant}-foreign"] + "-hf"
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["architectures"] == [HYBRID_VARIANTS[variant][1]]
    original, got = load_hf_state(converted[variant]), load_hf_state(back)
    assert sorted(got) == sorted(original)
    for k, v in original.items():
        _assert_bitwise(got[k], v, k)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(converted[variant], dtype=torch.float32)(tokens).logits
        have = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(tokens).logits
    assert torch.equal(have, want)
