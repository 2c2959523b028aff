"""torchrun worker: convert a Qwen3-Next model, load each output into Megatron-Core's real Qwen3-Next GPTModel on
CPU (tests/qwen3_next_cpu.py: strict load_state_dict of the legacy files, dist_checkpointing.load of torch_dist),
compare its logits with HF's, and convert it back to HF.

argv[1]: JSON list of cases {load, save, back, format, tp, pp, ep, etp}; argv[2]: JSON results written by rank 0
(the case with its max relative logits difference).
"""

import json
import os
import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from qwen3_next_cpu import build_qwen3_next_models

    from dist_reshard.testing import mcore_cpu
    from dist_reshard.run.options import Options
    from dist_reshard.run.job import run
    from dist_reshard.config.layout import HFLayout, TargetLayout
    from dist_reshard.config.layout import padded_vocab_size

    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        layout = TargetLayout(tp=case["tp"], pp=case["pp"], ckpt_format=case["format"], ep=case["ep"],
                              etp=case["etp"])
        run(Options(load=case["load"], save=case["save"], layout=layout, overwrite=True))
        run(Options(load=case["save"], save=case["back"], layout=HFLayout(), overwrite=True, src="mcore"))
        mcore_cpu.init_parallel(case["tp"], case["pp"], ep=case["ep"], etp=case["etp"])
        from megatron.core import parallel_state as ps

        folder = os.path.join(case["save"], "iter_0000001")
        if case["format"] == "torch":
            name = (f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
                    + (f"_{ps.get_pipeline_model_parallel_rank():03d}" if case["pp"] > 1 else "")
                    + (f"_{ps.get_expert_model_parallel_rank():03d}" if case["ep"] > 1 else ""))
            state = torch.load(os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)
            args = state["args"]
            models = build_qwen3_next_models(args)
            models[0].load_state_dict(state["model"], strict=True)
        else:
            args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
            args.padded_vocab_size = padded_vocab_size(args.true_vocab_size, args.make_vocab_size_divisible_by,
                                                       case["tp"])
            models = build_qwen3_next_models(args)
            mcore_cpu.load_torch_dist(models, folder)
        tokens = torch.randint(0, args.true_vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
        logits = mcore_cpu.forward_logits(models, tokens)[..., :args.true_vocab_size]
        if dist.get_rank() == 0:
            hf = AutoModelForCausalLM.from_pretrained(case["load"], dtype=torch.float32).eval()
            with torch.no_grad():
                expected = hf(tokens).logits.float()
            results.append(dict(case, rel_diff=mcore_cpu.relative_difference(logits, expected)))
        dist.barrier()
    mcore_cpu.write_results_and_exit(results, sys.argv[2])
