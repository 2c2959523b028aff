"""Block FP8 quantization as DeepSeek-V3 publishes it, written independently of the converter: the tests
quantize a bf16 model to make an FP8 source, and dequantize block by block for the expected tensors."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from conftest import load_hf_state  # imported lazily by conftest's fixtures, so conftest is loaded by then

FP8_MAX = 448.0  # largest float8_e4m3fn
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.")  # as in DeepSeek-V3's release


def quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in NOT_QUANTIZED)


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    b0, b1 = block
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    b0, b1 = block
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float() * s[i, j]
            out[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = blk.to(torch.bfloat16)
    return out


def _write(folder: str, state: dict[str, torch.Tensor], config: dict) -> None:
    """Two shard files and an index, as a published checkpoint has them."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(state)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(halves):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: state[n].contiguous() for n in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def make_fp8_pair(bf16_folder: str, fp8_folder: str, dequantized_folder: str, block: tuple[int, int]) -> None:
    """From a bf16 HF folder: its FP8 block-quantized form, and the bf16 tensors that form stands for."""
    with open(os.path.join(bf16_folder, "config.json")) as f:
        config = json.load(f)
    fp8, plain = {}, {}
    for name, t in load_hf_state(bf16_folder).items():
        if quantized(name, t):
            q, s = quantize(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            plain[name] = dequantize(q, s, block)
        else:
            fp8[name] = plain[name] = t
    _write(fp8_folder, fp8, dict(config, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}))
    _write(dequantized_folder, plain, config)
