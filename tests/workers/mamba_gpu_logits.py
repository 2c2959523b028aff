"""torchrun worker (1 process, CUDA): load a converted torch_dist MambaModel checkpoint into Megatron-Core's
real MambaModel (`mamba_stack_spec`: TransformerEngine and mamba_ssm kernels), run it on tokens and compare
its logits with the HF model's. argv: HF folder, Megatron checkpoint, JSON result path."""

import json
import os
import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mamba_cpu import build_mamba_model

    from dist_reshard.testing import mcore_cpu
    from dist_reshard.config.layout import padded_vocab_size
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    hf_dir, ckpt, out = sys.argv[1:4]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    folder = os.path.join(ckpt, "iter_0000001")
    args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
    # Written at TP2, loaded at TP1: torch_dist reshards on load (the vocabulary padding is allowed to differ).
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.padded_vocab_size = padded_vocab_size(args.true_vocab_size, args.make_vocab_size_divisible_by, 1)
    model = build_mamba_model(args, cpu=False).cuda()
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, folder)
    model.load_state_dict(state["model"], strict=True)
    tokens = torch.randint(0, args.true_vocab_size, (2, 16), generator=torch.Generator().manual_seed(7)).cuda()
    positions = torch.arange(16, device="cuda")[None].expand(2, -1)
    with torch.no_grad():
        logits = model(tokens, positions, None)[..., :args.true_vocab_size].float()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
        expected = hf(tokens).logits.float()
    rel = mcore_cpu.relative_difference(logits, expected)
    with open(out, "w") as f:
        json.dump(dict(rel_diff=rel), f)
    dist.destroy_process_group()
