"""torchrun worker: convert, then load the output into Megatron-Core's real MambaModel on CPU (see
tests/mamba_cpu.py): legacy files by a strict `load_state_dict`, torch_dist folders by
`dist_checkpointing.load` into the model's `sharded_state_dict()` at a chosen TP/PP. A torch_dist load is
also compared, tensor by tensor, with the legacy file the same conversion wrote for that layout (`legacy`),
so Megatron's own reading of the chunks must land every byte where the legacy shard has it.

argv[1]: JSON list of cases {load, save, format, tp, pp, src, load_tp, load_pp, legacy}; argv[2]: JSON
results written by rank 0 (one entry per case and rank: loaded keys, and tensors differing from `legacy`).
"""

import json
import os
import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mamba_cpu import build_mamba_model

    from dist_reshard.testing import mcore_cpu
    from dist_reshard.run.options import Options
    from dist_reshard.run.job import run
    from dist_reshard.config.layout import TargetLayout
    from dist_reshard.config.layout import padded_vocab_size

    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        if case.get("convert", True):
            layout = TargetLayout(tp=case["tp"], pp=case["pp"], ckpt_format=case["format"])
            run(Options(load=case["load"], save=case["save"], layout=layout, overwrite=True,
                        src=case.get("src", "hf")))
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        ltp, lpp = case.get("load_tp", case["tp"]), case.get("load_pp", case["pp"])
        mcore_cpu.init_parallel(ltp, lpp)
        from megatron.core import parallel_state as ps

        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        rank_file = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if lpp > 1 else "") + "/model_optim_rng.pt"
        folder = os.path.join(case["save"], "iter_0000001")
        if case["format"] == "torch":
            state = torch.load(os.path.join(folder, rank_file), weights_only=False)
            model = build_mamba_model(state["args"])
            model.load_state_dict(state["model"], strict=True)
        else:
            args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size = ltp, lpp
            args.decoder_first_pipeline_num_layers = case.get("load_first")  # an uneven split, or even
            args.padded_vocab_size = padded_vocab_size(args.true_vocab_size, args.make_vocab_size_divisible_by, ltp)
            model = build_mamba_model(args)
            mcore_cpu.load_torch_dist([model], folder)
        loaded = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        differ = []
        if case.get("legacy"):
            legacy = torch.load(os.path.join(case["legacy"], "iter_0000001", rank_file), weights_only=False)["model"]
            differ = sorted(k for k in set(loaded) | {k for k, v in legacy.items() if isinstance(v, torch.Tensor)}
                            if k not in loaded or k not in legacy or not torch.equal(loaded[k], legacy[k]))
        rel = None
        if case.get("hf"):  # a pattern without mamba layers runs forward on CPU: logits against the HF model
            from transformers import AutoModelForCausalLM

            vocab = (state["args"] if case["format"] == "torch" else args).true_vocab_size
            tokens = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))
            logits = mcore_cpu.forward_logits([model], tokens)[..., :vocab]
            hf = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).eval()
            with torch.no_grad():
                expected = hf(tokens).logits.float()
            rel = mcore_cpu.relative_difference(logits, expected)
        entry = dict(case, rank=dist.get_rank(), keys=sorted(loaded), differ=differ, rel_diff=rel)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entry)
        results.extend(gathered)
        dist.barrier()
    mcore_cpu.write_results_and_exit(results, sys.argv[2])
