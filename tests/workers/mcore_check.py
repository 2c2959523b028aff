"""torchrun worker: convert, then load the output into real Megatron-Core GPTModels on CPU and compare
the Megatron forward's logits with the HF model's.

argv[1]: JSON list of cases {load, save, format, tp, pp, vpp, ep, etp, impl, load_tp, load_pp, load_vpp,
load_ep, load_etp, an uneven split (TargetLayout's field names), load_split (the split to load torch_dist
with) and mcore_load (false: convert only)}, or {dst: "hf", load, save} for a conversion back to HF without a load; argv[2]: JSON results written by rank 0 (one entry per case: max relative logits
difference; with MTP layers also each MTP layer's, against transformers' MTP modules). The world size must be
a valid Megatron world for every loaded layout (TP x PP x DP, with ETP x EP dividing TP x DP).
"""

import json
import os
import sys

import torch

if __name__ == "__main__":
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dist_reshard.testing import mcore_cpu
    from dist_reshard.run.options import Options
    from dist_reshard.run.job import run
    from dist_reshard.config import megatron_args
    from dist_reshard.config.layout import HFLayout, TargetLayout

    # Uneven pipeline split fields of a case (TargetLayout's names).
    SPLIT = ("first_stage_layers", "last_stage_layers", "embedding_in_split", "loss_in_split", "stage_layout")
    from dist_reshard.config.layout import padded_vocab_size

    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        if case.get("dst") == "hf":  # the way back only (the test compares the files)
            run(Options(load=case["load"], save=case["save"], layout=HFLayout(), overwrite=True, src="mcore"))
            continue
        layout = TargetLayout(tp=case["tp"], pp=case["pp"], vpp=case.get("vpp"), ckpt_format=case["format"],
                              transformer_impl=case.get("impl", "local"), ep=case.get("ep", 1),
                              etp=case.get("etp"),
                              whole_chunk_bytes=case.get("whole_chunk_bytes", TargetLayout.whole_chunk_bytes),
                              max_chunk_bytes=case.get("max_chunk_bytes"), **{
                                  k: case[k] for k in SPLIT if k in case})
        run(Options(load=case["load"], save=case["save"], layout=layout, overwrite=True, src=case.get("src", "hf")))
        if case.get("mcore_load") is False:  # TE-spec legacy names: the CPU harness builds the local spec only
            continue
        me = dist.get_rank()
        ltp, lpp, lvpp = case.get("load_tp", case["tp"]), case.get("load_pp", case["pp"]), case.get("load_vpp", case.get("vpp"))
        lep, letp = case.get("load_ep", case.get("ep", 1)), case.get("load_etp", case.get("etp"))
        mcore_cpu.init_parallel(ltp, lpp, lvpp, ep=lep, etp=letp)
        from megatron.core import parallel_state as ps

        folder = os.path.join(case["save"], "iter_0000001")
        if case["format"] == "torch":
            tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            ep_rank = ps.get_expert_model_parallel_rank()
            name = (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if lpp > 1 else "")
                    + (f"_{ep_rank:03d}" if lep > 1 else ""))
            state = torch.load(os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)
            args = state["args"]
            models = mcore_cpu.build_gpt_models(args)
            for v, model in enumerate(models):
                model.load_state_dict(state[f"model{v}" if lvpp else "model"], strict=True)
        else:
            args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size = ltp, lpp
            args.virtual_pipeline_model_parallel_size = lvpp
            args.expert_model_parallel_size, args.expert_tensor_parallel_size = lep, letp or ltp
            args.padded_vocab_size = padded_vocab_size(args.true_vocab_size, args.make_vocab_size_divisible_by, ltp)
            if "load_split" in case:  # the pipeline split to load with (Megatron-LM's flags), else the stored one
                split = TargetLayout(pp=lpp, vpp=lvpp, **case["load_split"])
                vars(args).update(megatron_args._pipeline_args(split, args.num_layers // lpp))
            models = mcore_cpu.build_gpt_models(args)
            mcore_cpu.load_torch_dist(models, folder)
        gen = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, args.true_vocab_size, (2, 12), generator=gen)
        mtp_logits = [] if getattr(args, "mtp_num_layers", None) else None
        logits = mcore_cpu.forward_logits(models, tokens, mtp_logits)[..., :args.true_vocab_size]
        if me == 0:
            hf = AutoModelForCausalLM.from_pretrained(case.get("hf", case["load"]), dtype=torch.float32).eval()
            with torch.no_grad():
                expected = hf(tokens).logits.float()
            rel = mcore_cpu.relative_difference(logits, expected)
            results.append(dict(case, rel_diff=rel))
            if mtp_logits is not None:  # the MTP layers' own logits against transformers' MTP modules
                sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                from reference_mtp import hf_mtp_logits

                results[-1]["mtp_rel_diff"] = [mcore_cpu.relative_difference(got[..., :args.true_vocab_size], want)
                                               for got, want in zip(mtp_logits, hf_mtp_logits(hf, tokens))]
        dist.barrier()
    mcore_cpu.write_results_and_exit(results, sys.argv[2])
