"""An MXFP4 GPT-OSS checkpoint made from a bf16 one, and the bf16 checkpoint it stands for as transformers
itself decodes it (`integrations.mxfp4.convert_moe_packed_tensors`): the converter's own decoder is checked
against both. Quantization here is a plain round-to-nearest onto the E2M1 grid with a power-of-two scale per
32 values, written for the tests."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] -> (blocks [E, R, C/32, 16] uint8, scales [E, R, C/32] uint8): codes low nibble first."""
    e, r, c = w.shape
    groups = w.float().reshape(e, r, c // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    magnitude = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    codes = (magnitude | (scaled < 0).long() << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | codes[..., 1::2] << 4
    return blocks.contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8).contiguous()


def make_mxfp4_pair(bf16: str, mxfp4: str, dequantized: str) -> None:
    """`mxfp4`: `bf16` with every expert weight as `<name>_blocks` + `<name>_scales` in the published layout
    ([E, out, in]); `dequantized`: the same model with those weights as transformers decodes them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    for folder in (mxfp4, dequantized):
        shutil.copytree(bf16, folder)
        for name in os.listdir(folder):
            if name.endswith(".safetensors") or name == "model.safetensors.index.json":
                os.remove(os.path.join(folder, name))
    state = {}
    for name in sorted(os.listdir(bf16)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(bf16, name)))
    packed, decoded = {}, {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize(t.transpose(1, 2))  # HF's x @ W slabs -> the linear layer's [out, in]
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            decoded[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            packed[name] = decoded[name] = t
    save_file(packed, os.path.join(mxfp4, "model.safetensors"), metadata={"format": "pt"})
    save_file(decoded, os.path.join(dequantized, "model.safetensors"), metadata={"format": "pt"})
    path = os.path.join(mxfp4, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
