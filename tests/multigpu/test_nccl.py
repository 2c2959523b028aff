"""The real NCCL path: exchange buffers on the GPU. Skips cleanly without CUDA or enough GPUs."""


import pytest
import torch

from conftest import torchrun
from test_convert_exact import check_legacy, check_torch_dist


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("ngpu", [2, 4])
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_nccl_conversion_is_bit_exact(hf_models, tmp_path, ngpu, fmt):
    if _gpus() < ngpu:
        pytest.skip(f"needs {ngpu} CUDA GPUs, found {_gpus()}")
    save = tmp_path / "out"
    env_gpus = ",".join(str(i) for i in range(ngpu))
    tp, pp = (2, 1) if ngpu == 2 else (2, 2)
    torchrun(ngpu, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["qwen3"],
             "--save", str(save), "--tp", str(tp), "--pp", str(pp), "--ckpt-format", fmt, "--device", "cuda",
             gpus=env_gpus)
    case = dict(load=hf_models["qwen3"], save=str(save), tp=tp, pp=pp, vpp=None, impl="transformer_engine",
                format=fmt)
    check_legacy(case) if fmt == "torch" else check_torch_dist(case, tmp_path)
    # The NCCL-made output loads into Megatron-Core (on CPU, gloo) and gives the HF logits.
    proc = torchrun(tp * pp, "-m", "dist_reshard.demo", "--check", hf_models["qwen3"], str(save), "--tp", str(tp),
                    "--pp", str(pp), "--ckpt-format", fmt)
    assert "-> OK" in proc.stdout, proc.stdout
