"""torchrun worker: convert checkpoints written by Megatron-LM itself (tests/fixtures/megatron-lm-core_v0.16.1),
then load every Megatron-Core output into real GPTModels on CPU and record their logits on the fixture's ids.

argv[1]: JSON list of cases {load, save, dst ("hf"|"mcore"), hf_config, vocab_size, tp, pp, ep, etp, format,
ref}; argv[2]: JSON results written by rank 0: for each mcore case, the path of a .pt file with its logits.
"""

import json
import os
import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist

    from dist_reshard.testing import mcore_cpu
    from dist_reshard.run.options import Options
    from dist_reshard.run.job import run
    from dist_reshard.config.layout import HFLayout, TargetLayout

    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        if case["dst"] == "hf":
            layout = HFLayout()
        else:
            layout = TargetLayout(tp=case["tp"], pp=case["pp"], ckpt_format=case["format"], transformer_impl="local",
                                  ep=case.get("ep", 1), etp=case.get("etp"))
        run(Options(load=case["load"], save=case["save"], layout=layout, overwrite=True, src="mcore",
                    hf_config=case.get("hf_config"), vocab_size=case.get("vocab_size"), report=None))
        if case["dst"] == "hf":
            continue
        mcore_cpu.init_parallel(case["tp"], case["pp"], None, ep=case.get("ep", 1), etp=case.get("etp"))
        from megatron.core import parallel_state as ps

        folder = os.path.join(case["save"], "iter_0000001")
        if case["format"] == "torch":
            name = (f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
                    + (f"_{ps.get_pipeline_model_parallel_rank():03d}" if case["pp"] > 1 else "")
                    + (f"_{ps.get_expert_model_parallel_rank():03d}" if case.get("ep", 1) > 1 else ""))
            state = torch.load(os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)
            models = mcore_cpu.build_gpt_models(state["args"])
            models[0].load_state_dict(state["model"], strict=True)
        else:
            args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
            models = mcore_cpu.build_gpt_models(args)
            mcore_cpu.load_torch_dist(models, folder)
        ref = torch.load(case["ref"], weights_only=True)
        logits = mcore_cpu.forward_logits(models, ref["ids"])
        if dist.get_rank() == 0:
            path = case["save"] + ".logits.pt"
            torch.save(logits, path)
            results.append(dict(case, logits=path))
        dist.barrier()
    mcore_cpu.write_results_and_exit(results, sys.argv[2])
