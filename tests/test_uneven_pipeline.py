"""Uneven pipeline layouts in Megatron-Core 0.16.1's own terms.

Placement: for every layout of a grid, dist_reshard accepts exactly what real Megatron-Core accepts
(TransformerConfig and the functions that build the stages run), and then every chunk's layer count and
first global layer equal Megatron-Core's `get_num_layers_to_build` and `get_transformer_layer_offset`.
"""

import itertools
import re

import pytest
import torch

from dist_reshard.base.errors import ConversionError
from dist_reshard.config.layout import TargetLayout

LAYOUT_STRINGS = ["Et|tt|t|tL", "Ettt|tL", "E|t*4|tL", "Et*3|(tt|)*2,L", "Ett||ttL", "Et|t|t|t|t|tL", "tE|ttL",
                  "Ett|ttt", "Et|tm|L", "Ex|ttL", "EEt|tL", "Et|tL|L", "Et*2|t*2|tL"]


def _megatron(num_layers, pp, vpp, first=None, last=None, embed=False, loss=False, layout=None):
    """Megatron-Core's chunk layer counts and offsets [p][v], or None where it refuses the layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                                   pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                   pipeline_dtype=torch.float32, num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=last,
                                   account_for_embedding_in_pipeline_split=embed,
                                   account_for_loss_in_pipeline_split=loss, pipeline_model_parallel_layout=layout)
        vpp = config.virtual_pipeline_model_parallel_size  # a layout string sets it
        counts, offsets = [], []
        ps.set_virtual_pipeline_model_parallel_world_size(vpp)
        for p in range(pp):
            ps.set_pipeline_model_parallel_rank(p)
            stages = [None] if vpp is None else range(vpp)
            counts.append([get_num_layers_to_build(config, vp_stage=v, pp_rank=p) for v in stages])
            offsets.append([get_transformer_layer_offset(config, vp_stage=v, pp_rank=p) for v in stages])
    except (AssertionError, ValueError, ZeroDivisionError, KeyError):
        return None
    finally:
        ps.set_virtual_pipeline_model_parallel_world_size(None)
        ps.set_pipeline_model_parallel_rank(None)
    return counts, offsets


def _grid():
    for num_layers, pp, vpp in itertools.product([4, 5, 7, 8], [1, 2, 3, 4], [None, 2]):
        if vpp and pp < 2:
            continue
        for first, last in itertools.product([None, 1, 2, 3], [None, 1, 2, 4]):
            yield dict(num_layers=num_layers, pp=pp, vpp=vpp, first=first, last=last)
        for embed, loss in ((True, False), (False, True), (True, True)):
            yield dict(num_layers=num_layers, pp=pp, vpp=vpp, embed=embed, loss=loss)
        yield dict(num_layers=num_layers, pp=pp, vpp=vpp, first=2, embed=True)  # refused by both
    for num_layers, pp, layout in itertools.product([5, 6], [2, 3], LAYOUT_STRINGS):
        yield dict(num_layers=num_layers, pp=pp, vpp=None, layout=layout)
    yield dict(num_layers=5, pp=2, vpp=3, layout="Et|tt|t|tL")  # the VPP size conflicts with the layout


def test_stage_placement_matches_megatron_core():
    accepted = refused = 0
    for case in _grid():
        expected = _megatron(**case)
        layout = TargetLayout(pp=case["pp"], vpp=case["vpp"], first_stage_layers=case.get("first"),
                              last_stage_layers=case.get("last"), embedding_in_split=case.get("embed", False),
                              loss_in_split=case.get("loss", False), stage_layout=case.get("layout"))
        # Megatron-Core's checks let through first/last counts that exceed the model (a negative middle stage)
        # and, with one stage, splits that build too few layers: dist_reshard refuses those too.
        one_stage_split = case["pp"] == 1 and (case.get("first") or case.get("last"))
        if expected is None or one_stage_split or min(map(min, expected[0])) < 0:
            with pytest.raises(ConversionError):
                layout.chunk_layers(case["num_layers"])
            refused += 1
            continue
        got = layout.chunk_layers(case["num_layers"]), layout.chunk_offsets(case["num_layers"])
        assert got == expected, case
        placement = layout.layer_placement(case["num_layers"])
        assert sorted(placement) == sorted({(p, v, j) for p in range(layout.pp) for v in range(layout.chunks)
                                            for j in range(got[0][p][v])}), case
        accepted += 1
    assert accepted > 100 and refused > 100, (accepted, refused)


# Real conversions, each loaded by real Megatron-Core on 4 gloo ranks with the split Megatron-LM would use.
# `sizes`: each chunk's layers [p][v], written out by hand from Megatron-Core's rules (the reference's input).
SEVEN, EIGHT, MOE = "llama3_l7", "llama3_l8", "deepseek_v3_l5"
CONVERSIONS = [
    # (name, source model, written layout, layout loaded (torch_dist), chunk sizes of the written layout)
    ("first3-tp2pp2-torch", SEVEN, dict(tp=2, pp=2, format="torch", first_stage_layers=3), None, [[3], [4]]),
    ("tied-first1-pp4-torch", "llama3.2_l7", dict(tp=1, pp=4, format="torch", first_stage_layers=1), None,
     [[1], [2], [2], [2]]),
    ("embed-tp2pp2vpp2-torch", SEVEN, dict(tp=2, pp=2, vpp=2, format="torch", embedding_in_split=True), None,
     [[1, 2], [2, 2]]),
    ("string-tp2pp2-torch", SEVEN, dict(tp=2, pp=2, vpp=2, format="torch", stage_layout="Et|ttt|tt|tL"), None,
     [[1, 2], [3, 1]]),
    ("first3last3-pp4-dist-as-even-tp2pp2", EIGHT,
     dict(tp=1, pp=4, format="torch_dist", first_stage_layers=3, last_stage_layers=3),
     dict(load_tp=2, load_pp=2, load_split={}), None),
    ("even-tp2-dist-as-first3-tp2pp2", EIGHT, dict(tp=2, pp=1, format="torch_dist"),
     dict(load_tp=2, load_pp=2, load_split=dict(first_stage_layers=3)), None),
    ("string-dist-as-embed-pp4", SEVEN, dict(tp=2, pp=2, format="torch_dist", stage_layout="Ettt|ttttL"),
     dict(load_tp=1, load_pp=4, load_split=dict(embedding_in_split=True)), None),
    ("moe-first2-pp2ep2-torch", MOE, dict(tp=1, pp=2, ep=2, format="torch", first_stage_layers=2), None, [[2], [3]]),
    ("moe-last2-pp2ep2-dist-as-first2-tp2pp2", MOE,
     dict(tp=1, pp=2, ep=2, format="torch_dist", last_stage_layers=2),
     dict(load_tp=2, load_pp=2, load_ep=1, load_split=dict(first_stage_layers=2)), None),
]
# Megatron -> Megatron: the first conversion's output read under --src mcore (its split from its args).
RESHARDS = [("first3-tp2pp2-torch", "reshard-loss-pp4-torch", dict(tp=1, pp=4, format="torch", loss_in_split=True),
             [[2], [2], [2], [1]])]
ROUND_TRIPS = ["first3-tp2pp2-torch", "string-tp2pp2-torch", "moe-first2-pp2ep2-torch",
               "first3last3-pp4-dist-as-even-tp2pp2"]


@pytest.fixture(scope="module")
def uneven_models(tmp_path_factory):
    from dist_reshard.testing.tiny_models import build_model, save_model

    root = tmp_path_factory.mktemp("uneven_hf")
    out = {}
    for name, variant, layers in ((SEVEN, "llama3", 7), (EIGHT, "llama3", 8), ("llama3.2_l7", "llama3.2", 7),
                                  (MOE, "deepseek_v3", 5)):
        save_model(build_model(variant, seed=layers * 7 + len(variant), num_hidden_layers=layers), str(root / name))
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def uneven_results(uneven_models, tmp_path_factory):
    import json

    from conftest import torchrun

    root = tmp_path_factory.mktemp("uneven")
    cases = []
    for name, model, written, loaded, _ in CONVERSIONS:
        cases.append(dict(written, **(loaded or {}), name=name, load=uneven_models[model], save=str(root / name)))
    for first, name, written, _ in RESHARDS:
        model = next(c[1] for c in CONVERSIONS if c[0] == first)
        cases.append(dict(written, name=name, src="mcore", load=str(root / first), hf=uneven_models[model],
                          save=str(root / name)))
    for name in ROUND_TRIPS:
        cases.append(dict(name=name + "-hf", dst="hf", load=str(root / name), save=str(root / (name + "-hf"))))
    path, out = str(root / "cases.json"), str(root / "results.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(4, "tests/workers/mcore_check.py", path, out, timeout=900)
    with open(out) as f:
        return {r["name"]: r for r in json.load(f)}, root, uneven_models


def _case(name):
    for c in CONVERSIONS:
        if c[0] == name:
            return c[1], c[2], c[4]
    for _, n, written, sizes in RESHARDS:
        if n == name:
            return SEVEN, written, sizes
    raise KeyError(name)


@pytest.mark.parametrize("name", [c[0] for c in CONVERSIONS] + [r[1] for r in RESHARDS])
def test_megatron_core_loads_uneven_split_with_hf_logits(uneven_results, name):
    results, _, _ = uneven_results
    assert results[name]["rel_diff"] <= 1e-4, results[name]


@pytest.mark.parametrize("name", [c[0] for c in CONVERSIONS if c[4]] + [r[1] for r in RESHARDS])
def test_uneven_legacy_files_bit_exact(uneven_results, name):
    from conftest import load_hf_config, load_hf_state
    import reference
    import reference_moe

    _, root, models = uneven_results
    model, written, sizes = _case(name)
    hf, config = load_hf_state(models[model]), load_hf_config(models[model])
    tp, pp, vpp, ep = written["tp"], written["pp"], written.get("vpp"), written.get("ep", 1)
    if ep > 1:
        expected = reference_moe.legacy_files(hf, config, tp, pp, ep, None, "local", False,
                                              stage_sizes=[s[0] for s in sizes])
    else:
        expected = {k + (0,): v for k, v in reference.legacy_files(hf, config, tp, pp, vpp, "local",
                                                                   chunk_sizes=sizes).items()}
    folder = root / name / "iter_0000001"
    assert len(list(folder.iterdir())) == len(expected)
    for (r, p, k), containers in expected.items():
        rank = f"mp_rank_{r:02d}_{p:03d}" + (f"_{k:03d}" if ep > 1 else "")
        sd = torch.load(folder / rank / "model_optim_rng.pt", weights_only=False)
        for container, tensors in containers.items():
            assert sorted(k for k in sd[container] if not k.endswith("_extra_state")) == sorted(tensors), rank
            for key, value in tensors.items():
                got = sd[container][key]
                assert got.dtype == value.dtype and torch.equal(got.view(torch.uint8), value.contiguous().view(
                    torch.uint8)), f"{rank} {container} {key}"
        args = sd["args"]  # what Megatron-LM resumes with: its own flags for the split
        assert args.decoder_first_pipeline_num_layers == written.get("first_stage_layers")
        assert args.decoder_last_pipeline_num_layers == written.get("last_stage_layers")
        assert args.account_for_embedding_in_pipeline_split == written.get("embedding_in_split", False)
        assert args.account_for_loss_in_pipeline_split == written.get("loss_in_split", False)
        assert args.pipeline_model_parallel_layout == written.get("stage_layout")
        assert args.virtual_pipeline_model_parallel_size == vpp
        if vpp and not written.get("stage_layout"):
            assert args.num_virtual_stages_per_pipeline_rank == vpp and args.num_layers_per_virtual_pipeline_stage is None


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_uneven_round_trip_to_hf_byte_identical(uneven_results, name):
    from conftest import load_hf_state

    _, root, models = uneven_results
    model = _case(name)[0]
    original, back = load_hf_state(models[model]), load_hf_state(str(root / (name + "-hf")))
    assert sorted(original) == sorted(back)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key].view(torch.uint8), value.view(torch.uint8)), key


@pytest.mark.parametrize("fields,num_layers,ckpt_format,named", [
    (dict(pp=2, first_stage_layers=2, embedding_in_split=True), 8, "torch_dist",
     "cannot be set with account_for_embedding_in_pipeline_split"),
    (dict(pp=4, first_stage_layers=3), 8, "torch_dist", "middle layers must be divisible by the 3 middle"),
    (dict(pp=2, vpp=2, first_stage_layers=2, last_stage_layers=6), 8, "torch_dist", "division by zero"),
    (dict(pp=2, vpp=2, embedding_in_split=True), 8, "torch_dist", "num_layers + embedding + loss divisible"),
    (dict(pp=2, stage_layout="Et|tmL"), 2, "torch_dist", "it holds 1 MTP layers (m), the model 0"),
    (dict(pp=2, stage_layout="Ett|tt", ), 4, "torch_dist", "the last layer must be the loss (L)"),
    (dict(pp=2, stage_layout="Ett|tx|L"), 4, "torch_dist", "invalid layer character 'x'"),
    (dict(pp=2, stage_layout="Ett|tL", first_stage_layers=2), 3, "torch_dist",
     "cannot be set with other pipeline layout arguments"),
    (dict(pp=3, stage_layout="Ett||tL"), 3, "torch", "holds no layer"),
])
def test_refusals_name_megatron_core_rule(fields, num_layers, ckpt_format, named):
    from dist_reshard.config.hf_config import config_from_dict

    cfg = config_from_dict(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16,
                                intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=64), "config.json")
    with pytest.raises(ConversionError, match=re.escape(named)):
        TargetLayout(ckpt_format=ckpt_format, **fields).validate(cfg)
    if ckpt_format == "torch":  # the same split is fine where empty chunks can be stored
        TargetLayout(ckpt_format="torch_dist", **fields).validate(cfg)
