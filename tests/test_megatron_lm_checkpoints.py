"""Checkpoints written by Megatron-LM's own training code (tests/fixtures/megatron-lm-core_v0.16.1: dense TP2 and
Mixtral-shaped MoE EP2, after one Adam step, both formats; see its README) exported to HF and resharded: the HF
folder loads in transformers and computes Megatron's own stored logits, and Megatron-Core loads the reshards with
the same logits. One torchrun job (2 ranks) runs every conversion."""

import json
import os

import pytest
import torch

from conftest import torchrun

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron-lm-core_v0.16.1")
MODELS = ("dense_tp2", "moe_ep2")
FORMATS = ("torch", "torch_dist")
# Per fixture, a TP1 reshard from one format and another layout from the other.
RESHARDS = {
    "dense_tp2": [("torch_dist", dict(tp=1, pp=1, format="torch_dist")), ("torch", dict(tp=1, pp=2, format="torch"))],
    "moe_ep2": [("torch_dist", dict(tp=1, pp=1, format="torch_dist")),
                ("torch", dict(tp=2, pp=1, ep=2, etp=1, format="torch"))],
}


def _ref(model):
    return torch.load(os.path.join(FIXTURES, model, "ref.pt"), weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    cases, out = [], {}
    for model in MODELS:
        for fmt in FORMATS:
            load = os.path.join(FIXTURES, model, fmt)
            for how, extra in (("hf_config", dict(hf_config=os.path.join(FIXTURES, model, "hf_config"))),
                               ("vocab_size", dict(vocab_size=1000))):
                save = str(root / f"{model}-{fmt}-hf-{how}")
                cases.append(dict(extra, load=load, save=save, dst="hf"))
                out[(model, fmt, how)] = save
        for fmt, lay in RESHARDS[model]:
            save = str(root / (f"{model}-{fmt}-to-" + "-".join(f"{k}{v}" for k, v in lay.items())))
            cases.append(dict(lay, load=os.path.join(FIXTURES, model, fmt), save=save, dst="mcore",
                              ref=os.path.join(FIXTURES, model, "ref.pt")))
    path = str(root / "cases.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(2, "tests/workers/megatron_lm_logits.py", path, str(root / "results.json"), timeout=900)
    with open(root / "results.json") as f:
        out["mcore"] = json.load(f)
    return out


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("model", MODELS)
def test_hf_export_computes_megatrons_logits(converted, model):
    """--dst hf, with --hf-config and with only --vocab-size, from both formats: transformers loads the folder
    (exactly the true vocabulary, every MLP tensor present) and its float32 logits are Megatron's."""
    from transformers import AutoModelForCausalLM

    ref = _ref(model)
    want = ref["logits"][..., :ref["true_vocab"]].float()
    for fmt in FORMATS:
        for how in ("hf_config", "vocab_size"):
            folder = converted[(model, fmt, how)]
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            assert hf.config.architectures == (["MixtralForCausalLM"] if model == "moe_ep2" else ["LlamaForCausalLM"])
            assert hf.get_input_embeddings().weight.shape[0] == ref["true_vocab"]
            with torch.no_grad():
                got = hf(ref["ids"]).logits.float()
            print(f"{model} {fmt} --dst hf ({how}): max relative logits difference {_rel(got, want):.2e}")
            assert _rel(got, want) <= 1e-4, (fmt, how, _rel(got, want))


@pytest.mark.parametrize("model", MODELS)
def test_megatron_core_loads_the_reshards_with_megatrons_logits(converted, model):
    ref = _ref(model)
    want = ref["logits"][..., :ref["true_vocab"]].float()
    results = [r for r in converted["mcore"] if f"/{model}-" in r["save"]]
    assert len(results) == 2
    for r in results:
        got = torch.load(r["logits"], weights_only=True)[..., :ref["true_vocab"]]
        print(f"{os.path.basename(r['save'])}: max relative logits difference {_rel(got, want):.2e}")
        assert _rel(got, want) <= 1e-4, (r["save"], _rel(got, want))
