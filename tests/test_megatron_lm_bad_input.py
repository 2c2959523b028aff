"""Bad input around checkpoints written by Megatron-LM itself: an --hf-config that describes another model,
a vocabulary nobody states, args and tensors that disagree about the experts. Each is refused before any
tensor is read, naming the field and both values; through the real CLI every rank says so in one line and
nothing appears at --save."""

import json
import os
import shutil

import pytest
import torch

from conftest import torchrun
from dist_reshard.run.options import Options
from dist_reshard.run.job import _plan
from dist_reshard.base.errors import ConversionError
from dist_reshard.config.hf_config import config_from_dict
from dist_reshard.config.layout import HFLayout
from dist_reshard.source.megatron_source import open_source

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron-lm-core_v0.16.1")


def _reference(model, **changes):
    with open(os.path.join(FIXTURES, model, "hf_config", "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    return config


# (HF config change, the fact it contradicts, the value the checkpoint's args hold)
MISMATCHES = [
    (dict(num_hidden_layers=3), "num_layers", 2),
    (dict(hidden_size=128), "hidden_size", 64),
    (dict(num_attention_heads=8), "num_attention_heads", 4),
    (dict(num_key_value_heads=4), "num_query_groups", 2),
    (dict(head_dim=32), "kv_channels", 16),
    (dict(intermediate_size=128), "ffn_hidden_size", 96),
    (dict(rms_norm_eps=1e-6), "norm_epsilon", 1e-5),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "rope_theta", 500000.0),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), "rope_scaling", None),
    (dict(tie_word_embeddings=True), "tie_word_embeddings", False),
    (dict(attention_bias=True), "attention_bias", False),
]
MOE_MISMATCHES = [
    (dict(num_local_experts=8), "num_experts", 4),
    (dict(num_experts_per_tok=1), "moe_topk", 2),
]


@pytest.mark.parametrize("model,change,field,value", [("dense_tp2", *m) for m in MISMATCHES] +
                         [("moe_ep2", *m) for m in MOE_MISMATCHES])
def test_hf_config_preflight_names_the_field_and_both_values(model, change, field, value):
    reference = config_from_dict(_reference(model, **change))
    with pytest.raises(ConversionError) as e:
        open_source(os.path.join(FIXTURES, model, "torch_dist"), reference=reference)
    msg = str(e.value)
    assert msg.startswith(f"--hf-config: {field} = ") and f"but {value!r} in the checkpoint's args" in msg, msg


@pytest.mark.parametrize("change,says", [
    (dict(vocab_size=2000), "vocab_size = 2000 but the checkpoint stores 1024 rows"),
    (dict(vocab_size=700), "the true vocabulary is between 769 and 1024"),
    (dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"), "architectures = ['Qwen3ForCausalLM'] but"),
])
def test_hf_config_vocabulary_and_family_preflight(change, says):
    with pytest.raises(ConversionError, match=__import__("re").escape(says)):
        open_source(os.path.join(FIXTURES, "dense_tp2", "torch"),
                    reference=config_from_dict(_reference("dense_tp2", **change)))


def test_no_true_vocabulary_anywhere_asks_for_hf_config_or_vocab_size(tmp_path):
    """Megatron-LM with an HF tokenizer stores args.vocab_size = None: an HF folder of the 1024 padded rows
    would not load with the tokenizer's config, so the export refuses and says what to pass."""
    opts = Options(load=os.path.join(FIXTURES, "dense_tp2", "torch_dist"), save=str(tmp_path / "out"),
                   layout=HFLayout(), src="mcore")
    with pytest.raises(ConversionError, match="pass --hf-config HF_DIR or --vocab-size N"):
        _plan(opts)


def _copy_with_args(tmp_path, model, fmt, edit):
    """The fixture with its args edited in every file that stores them (a checkpoint whose args and tensors
    disagree, as a hand-edited or mis-merged run would leave)."""
    folder = str(tmp_path / f"{model}-{fmt}")
    shutil.copytree(os.path.join(FIXTURES, model, fmt), folder)
    for root, _, files in os.walk(folder):
        for name in files:
            if name in ("common.pt", "model_optim_rng.pt"):
                path = os.path.join(root, name)
                state = torch.load(path, weights_only=False)
                edit(state["args"])
                torch.save(state, path)
    return folder


def _no_experts(args):
    args.num_experts = None


def _experts(args):
    args.num_experts, args.moe_router_topk = 4, 2


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("model,edit,says", [
    # Expert tensors, args without experts: the dense mapping finds no MLP of its own.
    ("moe_ep2", _no_experts, r"has no experts|'decoder\.layers\.mlp\.linear_fc1\.weight' missing"),
    # MoE args, dense tensors: no router.
    ("dense_tp2", _experts, r"router"),
])
def test_args_and_tensors_disagreeing_about_experts_are_refused(tmp_path, fmt, model, edit, says):
    with pytest.raises(ConversionError, match=says):
        open_source(_copy_with_args(tmp_path, model, fmt, edit))


def _extra_legacy_tensor(folder):
    for root, _, files in os.walk(folder):
        if "model_optim_rng.pt" in files:
            path = os.path.join(root, "model_optim_rng.pt")
            state = torch.load(path, weights_only=False)
            state["model"]["decoder.layers.1.mlp.linear_fc3.weight"] = torch.ones(4, 64)
            torch.save(state, path)


def _extra_dist_tensor(folder):
    """A second tensor key in the DCP metadata, stored in the same bytes as the final norm."""
    import dataclasses
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    it = os.path.join(folder, "iter_0000100")
    md = FileSystemReader(it).read_metadata()
    md.state_dict_metadata["decoder.layers.mlp.linear_fc3.weight"] = md.state_dict_metadata["decoder.final_layernorm.weight"]
    for idx, info in list(md.storage_data.items()):
        if idx.fqn == "decoder.final_layernorm.weight":
            md.storage_data[dataclasses.replace(idx, fqn="decoder.layers.mlp.linear_fc3.weight")] = info
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("fmt,add", [("torch", _extra_legacy_tensor), ("torch_dist", _extra_dist_tensor)])
def test_a_model_tensor_the_mapping_does_not_use_is_never_dropped(tmp_path, fmt, add):
    folder = str(tmp_path / fmt)
    shutil.copytree(os.path.join(FIXTURES, "dense_tp2", fmt), folder)
    add(folder)
    with pytest.raises(ConversionError, match=r"model tensors of the checkpoint are not part of the llama mapping "
                                              r"its args describe \(first: .*mlp\.linear_fc3\.weight.*converting "
                                              r"would drop them"):
        open_source(folder)


def test_non_model_state_is_skipped_by_name_with_count_and_bytes():
    for fmt in ("torch", "torch_dist"):
        skipped = open_source(os.path.join(FIXTURES, "moe_ep2", fmt)).skipped
        assert skipped["optimizer"][0] > 0 and skipped["optimizer"][1] > 0, (fmt, skipped)
        assert skipped["_extra_state"][0] > 0 and "rng_state" in skipped, (fmt, skipped)


def test_mismatched_hf_config_through_the_cli(tmp_path):
    """2 ranks: each prints one error line naming the field and exits 1; nothing at --save."""
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps(_reference("moe_ep2", num_hidden_layers=3)))
    save = tmp_path / "out"
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "mcore", "--dst", "hf", "--load",
                    os.path.join(FIXTURES, "moe_ep2", "torch"), "--save", str(save), "--hf-config", str(ref),
                    check=False, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dist_reshard: error:")]
    assert len(lines) == 2 and len(set(lines)) == 1, proc.stderr[-3000:]
    assert "--hf-config: num_layers = 3 in the HF config but 2 in the checkpoint's args" in lines[0]
    assert not save.exists() and not [p for p in os.listdir(tmp_path) if "staging" in p]
