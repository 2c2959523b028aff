"""torchrun worker: convert an HF LLaVA, load the output into Megatron-Core's LLaVAModel on CPU (strict
load_state_dict of legacy files, dist_checkpointing.load of torch_dist) and compare its logits on one image
and prompt with the HF model's.

argv[1]: JSON list of cases {load, save, format, tp, pp}; argv[2]: JSON results written by rank 0 (each case
with its max relative logits difference). The world size is TP x PP.
"""

import json
import os
import sys

import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch.distributed as dist
    from transformers import LlavaForConditionalGeneration

    from dist_reshard.testing import mcore_cpu
    from dist_reshard.run.options import Options
    from dist_reshard.run.job import run
    from dist_reshard.config.layout import TargetLayout
    from mcore_llava import build_llava_model, llava_logits

    def image_features(args) -> int:
        """Image features per image: the patches, and the class token (none in SigLIP) unless it is dropped."""
        return (args.img_h // args.patch_dim) ** 2 + (0 if args.disable_vision_class_token else args.class_token_len)

    def sequence_length(args) -> int:
        return TEXT_TOKENS + image_features(args)

    TEXT_TOKENS = 10
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        layout = TargetLayout(tp=case["tp"], pp=case["pp"], ckpt_format=case["format"], transformer_impl="local")
        run(Options(load=case["load"], save=case["save"], layout=layout, overwrite=True))
        mcore_cpu.init_parallel(case["tp"], case["pp"])
        from megatron.core import parallel_state as ps

        folder = os.path.join(case["save"], "iter_0000001")
        if case["format"] == "torch":
            tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if case["pp"] > 1 else "")
            state = torch.load(os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)
            args = state["args"]
            model = build_llava_model(args, sequence_length(args))
            model.load_state_dict(state["model"], strict=True)
        else:
            args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
            model = build_llava_model(args, sequence_length(args))
            mcore_cpu.load_torch_dist([model], folder)
        gen = torch.Generator().manual_seed(7)
        images = torch.randn(1, 3, args.img_h, args.img_w, generator=gen)
        text = torch.randint(0, args.image_token_index, (1, TEXT_TOKENS), generator=gen)
        image_tokens = image_features(args)
        # Megatron: one image token stands for the whole image; HF: one per image feature.
        mcore_ids = torch.cat([text[:, :2], torch.full((1, 1), args.image_token_index), text[:, 2:]], 1)
        hf_ids = torch.cat([text[:, :2], torch.full((1, image_tokens), args.image_token_index), text[:, 2:]], 1)
        logits = llava_logits(model, images, mcore_ids, hf_ids.shape[1], args.true_vocab_size)
        if dist.get_rank() == 0:
            hf = LlavaForConditionalGeneration.from_pretrained(case["load"], dtype=torch.float32).eval()
            with torch.no_grad():
                expected = hf(input_ids=hf_ids, pixel_values=images).logits.float()
            rel = mcore_cpu.relative_difference(logits, expected)
            results.append(dict(case, rel_diff=rel))
        dist.barrier()
    mcore_cpu.write_results_and_exit(results, sys.argv[2])
