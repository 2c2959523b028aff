"""torchrun worker: a script that made its own process group calls `dist_reshard.convert` in it.

argv: HF_DIR OUT_DIR. Converts HF -> Megatron-Core (torch_dist, TP2) and back to HF in the caller's group, then
makes a call that must fail, then uses the group itself; writes what it saw to OUT_DIR/rank<r>.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

if __name__ == "__main__":
    import dist_reshard

    hf_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    me = dist.get_rank()
    seen = {}
    there = dist_reshard.convert(src="hf", dst="mcore", load=hf_dir, save=os.path.join(out, "mcore"), tp=2,
                                 transformer_impl="local")
    seen["there"] = dict(world_size=there["world_size"], read=there["bytes_read_total"], source=there["source_bytes"])
    seen["initialized_after_job"] = dist.is_initialized()
    back = dist_reshard.convert(src="mcore", dst="hf", load=os.path.join(out, "mcore"), save=os.path.join(out, "back"))
    seen["back_world_size"] = back["world_size"]
    try:
        dist_reshard.convert(src="hf", dst="mcore", load=os.path.join(out, "missing"), save=os.path.join(out, "bad"))
        seen["error"] = None
    except dist_reshard.ConversionError as e:
        seen["error"] = str(e)
    seen["bad_save_exists"] = os.path.exists(os.path.join(out, "bad"))
    total = torch.tensor([me + 1])
    dist.all_reduce(total)  # the caller's group still works after a failed job
    seen["all_reduce"] = int(total.item())
    with open(os.path.join(out, f"rank{me}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as launch.py: DCP's save can leave a C++ thread that aborts interpreter teardown
