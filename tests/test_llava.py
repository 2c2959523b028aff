"""LLaVA (HF LlavaForConditionalGeneration <-> Megatron-Core LLaVAModel): real LLaVAModels on CPU loading the
output with logits equal to HF's, bit-exact against tests/reference_llava.py, round trips, refusals."""

import json
import os
import shutil

import pytest
import torch

from conftest import load_hf_state, run_cases, torchrun
from dist_reshard.base.errors import ConversionError
from dist_reshard.source.hf_source import open_hf_folder
from dist_reshard.config.layout import TargetLayout
from dist_reshard.plan.planner import make_plan
from dist_reshard.testing.tiny_models import build_llava, save_model
from reference_llava import llava_legacy_files

# Tensors of the tower LLaVA never reads: CLIP (vision_feature_layer -2): the last of 3 layers and post_layernorm;
# SigLIP (the post-normed last layer): its attention-pooling head.
UNUSED = {"hf": ("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm."),
          "hf_siglip": ("vision_tower.head.",)}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    folder = save_model(build_llava(seed=3), str(root / "hf"))
    # The class token kept and every CLIP layer used; a Mistral language model.
    save_model(build_llava(seed=4, vision_feature_select_strategy="full", vision_feature_layer=-1),
               str(root / "hf_full"))
    save_model(build_llava(seed=5, text_model="mistral"), str(root / "hf_mistral"))
    # A SigLIP tower: every layer read post-normed (tie_last_hidden_states), strategy "full", pooling head kept.
    save_model(build_llava(seed=6, vision_model="siglip"), str(root / "hf_siglip"))
    # The same weights under transformers 5's module names and under older hub checkpoints' CLIP wrapper.
    from safetensors.torch import save_file

    state = load_hf_state(folder)
    for name, rename in (("hf_module_names", {"language_model.model.": "model.language_model.",
                                              "language_model.lm_head.": "lm_head.",
                                              "vision_tower.": "model.vision_tower.",
                                              "multi_modal_projector.": "model.multi_modal_projector."}),
                         ("hf_hub_names", {"vision_tower.": "vision_tower.vision_model."})):
        other = root / name
        other.mkdir()
        shutil.copy(os.path.join(folder, "config.json"), other / "config.json")
        renamed = {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v.contiguous()
                   for k, v in state.items()}
        save_file(renamed, str(other / "model.safetensors"))
    return root


def test_logits_match_hf(llava, tmp_path):
    """LLaVAModel at TP2 and PP2, legacy (strict load) and torch_dist (dist_checkpointing.load), with a CLIP and
    a SigLIP tower (PP2 legacy only); at TP2 also with the class token kept and all CLIP layers used (strategy
    "full", feature layer -1), and with Mistral."""
    cases = [dict(load=str(llava / src), save=str(tmp_path / f"{src}_{fmt}_tp{tp}_pp{pp}"), format=fmt, tp=tp, pp=pp)
             for src in ("hf", "hf_siglip") for tp, pp in ((2, 1), (1, 2)) for fmt in ("torch", "torch_dist")
             if src == "hf" or (tp, fmt) != (1, "torch_dist")]
    cases += [dict(load=str(llava / src), save=str(tmp_path / src), format="torch", tp=2, pp=1)
              for src in ("hf_full", "hf_mistral")]
    path, out = tmp_path / "cases.json", tmp_path / "results.json"
    path.write_text(json.dumps(cases))
    torchrun(2, "tests/workers/llava_check.py", str(path), str(out), timeout=900)
    results = json.loads(out.read_text())
    assert len(results) == len(cases)
    for r in results:
        assert r["rel_diff"] <= 1e-4, r


@pytest.fixture(scope="module")
def converted(llava, tmp_path_factory):
    """HF -> TP2 legacy and torch_dist (local spec), from each name layout and the SigLIP model, then each back
    to HF."""
    out = tmp_path_factory.mktemp("llava_out")
    cases = [dict(load=str(llava / src), save=str(out / f"{src}_{fmt}"), format=fmt, tp=2, pp=1, impl="local")
             for src in ("hf", "hf_module_names", "hf_hub_names", "hf_siglip") for fmt in ("torch", "torch_dist")]
    cases += [dict(load=str(llava / src), save=str(out / f"{src}_tp2_pp2"), format="torch", tp=2, pp=2, impl="local")
              for src in ("hf", "hf_siglip")]
    cases += [dict(src="mcore", dst="hf", load=str(out / f"{src}_{fmt}"), save=str(out / f"back_{src}_{fmt}"))
              for src in ("hf", "hf_siglip") for fmt in ("torch", "torch_dist")]
    # Megatron -> Megatron in another layout (TP2 legacy -> PP2 torch_dist), then back to HF.
    for src in ("hf", "hf_siglip"):
        cases += [dict(src="mcore", load=str(out / f"{src}_torch"), save=str(out / f"{src}_resharded"),
                       format="torch_dist", tp=1, pp=2, impl="local"),
                  dict(src="mcore", dst="hf", load=str(out / f"{src}_resharded"),
                       save=str(out / f"back_{src}_resharded"))]
    run_cases(2, cases, out)
    return out


@pytest.mark.parametrize("src, pp", [("hf", 1), ("hf_module_names", 1), ("hf_hub_names", 1), ("hf", 2),
                                     ("hf_siglip", 1), ("hf_siglip", 2)])
def test_bit_exact_tp2(llava, converted, src, pp):
    from transformers import AutoConfig

    model = "hf_siglip" if src == "hf_siglip" else "hf"
    config = AutoConfig.from_pretrained(str(llava / model))
    expected = llava_legacy_files(load_hf_state(str(llava / model)), config, 2, pp)
    folder = converted / (f"{src}_torch" if pp == 1 else f"{src}_tp2_pp2") / "iter_0000001"
    for (r, p), want in expected.items():
        name = f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "")
        state = torch.load(folder / name / "model_optim_rng.pt", weights_only=False)
        got = {k: v for k, v in state["model"].items() if not k.endswith("_extra_state")}
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert got[k].shape == v.shape and torch.equal(got[k], v), k
        args = state["args"]
        if model == "hf_siglip":  # every layer; no class token to drop (LLaVAModel asserts it is not dropped)
            assert (args.vision_model_type, args.encoder_num_layers, args.class_token_len) == ("siglip", 3, 0)
            assert (args.img_h, args.img_w, args.patch_dim) == (32, 32, 8)  # 36 px: the 4 x 4 grid covers 32
            assert not args.disable_vision_class_token and args.vision_activation == "gelu_pytorch_tanh"
        else:
            assert args.vision_model_type == "clip" and args.encoder_num_layers == 2
            assert args.disable_vision_class_token and args.class_token_len == 1


@pytest.mark.parametrize("src, fmt", [("hf", "torch"), ("hf", "torch_dist"), ("hf", "resharded"),
                                      ("hf_siglip", "torch"), ("hf_siglip", "torch_dist"),
                                      ("hf_siglip", "resharded")])
def test_round_trip_reproduces_source(llava, converted, src, fmt):
    """HF -> Megatron -> HF: every tensor LLaVA uses comes back bit for bit, under save_pretrained's names,
    with the source config; the unused tower tensors are the only ones left out."""
    back_folder = converted / f"back_{src}_{fmt}"
    source, back = load_hf_state(str(llava / src)), load_hf_state(str(back_folder))
    kept = {k for k in source if not k.startswith(UNUSED[src])}
    assert sorted(back) == sorted(kept) and len(kept) < len(source)
    for k in kept:
        assert back[k].dtype == source[k].dtype and torch.equal(back[k], source[k]), k
    with open(llava / src / "config.json") as f, open(back_folder / "config.json") as g:
        assert json.load(f) == json.load(g)


@pytest.mark.parametrize("src", ["hf", "hf_siglip"])
def test_export_without_stored_hf_config(llava, converted, tmp_path, src):
    """A LLaVAModel checkpoint whose args carry no HF config is recognised by its vision args; the exported
    HF model (a CLIP tower of exactly the layers Megatron holds, read at its last; a SigLIP tower read
    post-normed, without the pooling head) gives the source's logits."""
    from transformers import LlavaForConditionalGeneration

    bare = tmp_path / "bare"
    shutil.copytree(converted / f"{src}_torch", bare)
    for r in range(2):
        path = bare / "iter_0000001" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        del state["args"].hf_config
        torch.save(state, path)
    run_cases(2, [dict(src="mcore", dst="hf", load=str(bare), save=str(tmp_path / "exported"))], tmp_path)
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    vision = cfg["vision_config"]
    assert cfg["vision_feature_layer"] == -1
    if src == "hf_siglip":
        assert (vision["model_type"], vision["num_hidden_layers"], vision["tie_last_hidden_states"],
                vision["vision_use_head"], vision["image_size"], cfg["vision_feature_select_strategy"]) == (
            "siglip_vision_model", 3, True, False, 32, "full")
    else:
        assert vision["model_type"] == "clip_vision_model" and vision["num_hidden_layers"] == 2
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 32, 32, generator=gen)
    ids = torch.cat([torch.randint(0, 999, (1, 3), generator=gen), torch.full((1, 16), 999),
                     torch.randint(0, 999, (1, 5), generator=gen)], 1)
    logits = []
    for folder in (llava / src, tmp_path / "exported"):
        model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids, pixel_values=images).logits)
    assert torch.equal(logits[0], logits[1])


def test_hf_config_preflight_reads_text_config(llava, converted):
    """--hf-config of a LLaVA conversion: the language model's sizes live in text_config, which the preflight
    reads (and names a difference there)."""
    from dist_reshard.config.hf_config import config_from_dict, read_config
    from dist_reshard.source.megatron_source import open_source

    source = open_source(str(converted / "hf_torch"), reference=read_config(str(llava / "hf")))
    assert source.config.num_layers == read_config(str(llava / "hf")).num_layers
    raw = json.loads((llava / "hf" / "config.json").read_text())
    raw["text_config"] = dict(raw["text_config"], num_hidden_layers=raw["text_config"]["num_hidden_layers"] + 1)
    with pytest.raises(ConversionError, match="--hf-config: num_layers = "):
        open_source(str(converted / "hf_torch"), reference=config_from_dict(raw))


def test_siglip_pre_norm_features_differ(llava):
    """Why a SigLIP tower without tie_last_hidden_states is refused: HF LLaVA then reads the last layer before
    post_layernorm, which changes its logits far beyond the 1e-4 that the converted (ln_post) model meets."""
    from transformers import LlavaForConditionalGeneration

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 32, 32, generator=gen)
    ids = torch.cat([torch.randint(0, 999, (1, 3), generator=gen), torch.full((1, 16), 999)], 1)
    model = LlavaForConditionalGeneration.from_pretrained(str(llava / "hf_siglip"), dtype=torch.float32).eval()
    logits = []
    for tie in (True, False):
        model.model.vision_tower.config.tie_last_hidden_states = tie
        with torch.no_grad():
            logits.append(model(input_ids=ids, pixel_values=images).logits)
    assert ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item() > 1e-2


def test_torch_dist_keys(converted):
    """LLaVAModel's torch_dist keys: prefixed, each layer stack on its own layer axis, class token [1, 1, H]."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(converted / "hf_torch_dist" / "iter_0000001")).read_metadata().state_dict_metadata
    assert list(md["vision_model.decoder.layers.self_attention.linear_qkv.weight"].size) == [2, 96, 32]
    assert list(md["vision_model.decoder.layers.input_layernorm.bias"].size) == [2, 32]
    assert list(md["language_model.decoder.layers.self_attention.linear_qkv.weight"].size) == [4, 128, 64]
    assert list(md["vision_model.class_token"].size) == [1, 1, 32]
    assert list(md["vision_projection.encoder.linear_fc1.weight"].size) == [64, 32]
    # SigLIP: a conv1 bias and ln_post, positions for the 16 patches alone, no class token or ln_pre.
    md = FileSystemReader(str(converted / "hf_siglip_torch_dist" / "iter_0000001")).read_metadata().state_dict_metadata
    for key, size in (("vision_model.conv1.bias", [32]), ("vision_model.ln_post.weight", [32]),
                      ("vision_model.position_embeddings.weight", [16, 32]),
                      ("vision_model.decoder.layers.self_attention.linear_qkv.weight", [3, 96, 32])):
        assert list(md[key].size) == size, key
    assert not any(k.startswith(("vision_model.class_token", "vision_model.ln_pre")) for k in md)


def _edited(llava, tmp_path, edit, src="hf") -> str:
    folder = tmp_path / "edited"
    shutil.copytree(llava / src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.mark.parametrize("edit, layout, message", [
    (lambda c: c.update(vision_feature_layer=[-2, -1]), {}, "vision_feature_layer = [-2, -1]: Megatron-Core"),
    (lambda c: c.update(vision_feature_layer=0), {}, "vision_feature_layer = 0 selects the vision embeddings"),
    (lambda c: c["vision_config"].update(model_type="dinov2"), {},
     "vision_config.model_type = 'dinov2': supported vision towers: clip_vision_model, siglip_vision_model"),
    (lambda c: c["text_config"].update(model_type="qwen2"), {}, "text_config.model_type = 'qwen2'"),
    (lambda c: c.update(projector_hidden_act="gelu_pytorch_tanh"), {}, "projector_hidden_act = 'gelu_pytorch_tanh'"),
    (lambda c: c["vision_config"].update(num_attention_heads=2), dict(tp=4),
     "--tp 4: vision num_attention_heads = 2 is not divisible"),
    (lambda c: None, dict(pp=2, vpp=2), "--vpp: not supported for LLaVA"),
])
def test_refusals(llava, tmp_path, edit, layout, message):
    _refused(_edited(llava, tmp_path, edit), layout, message)


def _refused(folder, layout, message):
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg, family, index = open_hf_folder(folder)
        make_plan(family, index, cfg, TargetLayout(ckpt_format="torch", **layout), 2)


@pytest.mark.parametrize("edit, message", [
    # HF takes these hidden states before post_layernorm; Megatron's siglip CLIPViTModel always applies ln_post.
    (lambda c: c.update(vision_feature_layer=-2), "vision_feature_layer = -2 with a SigLIP tower"),
    (lambda c: c.update(vision_feature_layer=2), "vision_feature_layer = 2 with a SigLIP tower"),
    (lambda c: c["vision_config"].pop("tie_last_hidden_states"),
     "tie_last_hidden_states = None: HF LLaVA takes that hidden state before post_layernorm"),
    (lambda c: c["vision_config"].update(tie_last_hidden_states=False), "tie_last_hidden_states = False"),
    # "default" drops SigLIP's first patch; LLaVAModel asserts SigLIP's features are not cropped.
    (lambda c: c.update(vision_feature_select_strategy="default"),
     "vision_feature_select_strategy = 'default' with a SigLIP tower drops its first patch"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "vision_config.hidden_act = 'relu'"),
    (lambda c: c["vision_config"].update(image_size=[32, 48]), "vision_config.image_size / patch_size = [32, 48]"),
    (lambda c: c["vision_config"].update(image_size=6), "vision_config.image_size 6 is smaller than patch_size 8"),
])
def test_siglip_refusals(llava, tmp_path, edit, message):
    """SigLIP settings Megatron-Core's CLIPViTModel (subtype siglip) cannot compute, refused by name."""
    _refused(_edited(llava, tmp_path, edit, "hf_siglip"), {}, message)



# llava-1.5-7b-hf's config.json as published: only the fields that differ from transformers' defaults.
LLAVA_15_7B = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
               "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
               "torch_dtype": "float16",
               "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                               "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                               "vocab_size": 32064},
               "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                 "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                                 "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}}


def _planned_from_meta(raw: dict):
    """A published-size LLaVA config: transformers' own model on the meta device gives the tensors (under the hub's
    names, F16), planned over 16 simulated ranks at TP4 PP4. (tensors, config, source index, plan)."""
    import transformers

    from dist_reshard.families import family_for
    from dist_reshard.config.hf_config import config_from_dict
    from synthetic import lay_out

    config = transformers.LlavaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(config)
    hub = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
           "model.vision_tower.": "vision_tower.vision_model.", "model.multi_modal_projector.": "multi_modal_projector."}
    tensors = {next(new + k[len(old):] for old, new in hub.items() if k.startswith(old)): (tuple(t.shape), "F16")
               for k, t in model.state_dict().items()}
    cfg = config_from_dict(raw)
    family = family_for(cfg.architecture)
    index = family.source_index(lay_out(tensors, 5 << 30), cfg)
    return tensors, cfg, index, make_plan(family, index, cfg, TargetLayout(tp=4, pp=4, ckpt_format="torch"), 16)


def test_llava_15_7b_plan():
    """The published 7B config (transformers' defaults fill the rest) over 16 simulated ranks at TP4 PP4: tensor
    names and shapes from transformers' own model on the meta device under the hub's names; 23 CLIP layers on
    the first stage; every byte LLaVA uses read exactly once, the unused CLIP layer and post_layernorm never."""
    tensors, cfg, index, plan = _planned_from_meta(LLAVA_15_7B)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size) == (32, 4096, 11008, 32064)
    assert cfg.stack("vision").num_layers == 23
    unused = [n for n in tensors if n.startswith(("vision_tower.vision_model.encoder.layers.23.",
                                                  "vision_tower.vision_model.post_layernorm."))]
    assert len(unused) == 18 and not any(n.replace("vision_model.", "", 1) in index for n in unused)
    assert plan.source_bytes == sum(t.nbytes for t in index.values())
    read = {}
    for item in plan.items:
        read[item.source] = read.get(item.source, 0) + item.nbytes
    assert read == {n: t.nbytes for n, t in index.items()}
    files = {u.index: u.path for u in plan.units}
    vision = {files[t.unit] for t in plan.targets if t.key.startswith(("vision_model.", "vision_projection."))}
    assert vision == {f"iter_0000001/mp_rank_{r:02d}_000/model_optim_rng.pt" for r in range(4)}
    layers = {int(t.key.split(".")[3]) for t in plan.targets if t.key.startswith("vision_model.decoder.layers.")}
    assert layers == set(range(23))


def test_siglip_so400m_plan():
    """A LLaVA with SigLIP so400m at 384 px (27 layers of 1152, 729 patches; hub names `vision_tower.vision_model.`)
    over 16 simulated ranks at TP4 PP4: names and shapes from transformers' own model on the meta device; all 27
    layers, conv1 bias and ln_post on the first stage; every byte used read once, the pooling head never."""
    raw = dict(LLAVA_15_7B, vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=729,
               vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                  num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14,
                                  tie_last_hidden_states=True))
    tensors, cfg, index, plan = _planned_from_meta(raw)
    head = [n for n in tensors if n.startswith("vision_tower.vision_model.head.")]
    assert head and not any(n.replace("vision_model.", "", 1) in index for n in head)
    assert len(index) == len(tensors) - len(head)
    read = {}
    for item in plan.items:
        read[item.source] = read.get(item.source, 0) + item.nbytes
    assert read == {n: t.nbytes for n, t in index.items()}
    files = {u.index: u.path for u in plan.units}
    shapes = {(t.key, files[t.unit]): t.shape for t in plan.targets}
    first = "iter_0000001/mp_rank_00_000/model_optim_rng.pt"
    assert shapes[("vision_model.conv1.bias", first)] == (1152,)
    assert shapes[("vision_model.position_embeddings.weight", first)] == (729, 1152)
    assert shapes[("vision_model.ln_post.weight", first)] == (1152,)
    assert shapes[("vision_model.decoder.layers.26.mlp.linear_fc1.weight", first)] == (4304 // 4, 1152)
    assert not any(k.startswith(("vision_model.class_token", "vision_model.ln_pre")) for k, _ in shapes)
