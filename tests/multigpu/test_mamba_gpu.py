"""Megatron-Core's MambaModel on a GPU (TransformerEngine and mamba_ssm kernels) gives the HF logits of the
converted Nemotron-H and Mamba-2 models. Skips cleanly without CUDA, TransformerEngine or mamba_ssm."""

import importlib.util
import json

import pytest
import torch

from conftest import torchrun
from dist_reshard.testing.tiny_models import HYBRID_VARIANTS, build_model, save_model


def _missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    for module in ("transformer_engine", "mamba_ssm", "causal_conv1d"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module} (Megatron-Core's Mamba layers run its kernels)"
    return None


@pytest.mark.parametrize("variant", list(HYBRID_VARIANTS))
def test_megatron_mamba_logits_match_hf(tmp_path, variant):
    why = _missing()
    if why:
        pytest.skip(why)
    hf = save_model(build_model(variant, seed=5), str(tmp_path / "hf"))
    save = str(tmp_path / "mcore")
    torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf, "--save", save,
             "--tp", "2", "--ckpt-format", "torch_dist", "--device", "cpu")
    out = str(tmp_path / "result.json")
    torchrun(1, "tests/workers/mamba_gpu_logits.py", hf, save, out, gpus="0")
    with open(out) as f:
        rel = json.load(f)["rel_diff"]
    # The SSD scan runs chunked in Triton on one side and as transformers' torch (or the same) kernels on the
    # other, both float32: agreement to 1e-3 of the largest logit.
    assert rel < 1e-3, rel
