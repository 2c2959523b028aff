"""torchrun worker: runs several conversions in one process group (start-up paid once).

argv[1] is a JSON file with a list of cases; each case's job report is written next to its output.
"""

import dataclasses
import json
import os
import sys

if __name__ == "__main__":
    from dist_reshard.exchange import collectives
    from dist_reshard.run.options import Options
    from dist_reshard.run.job import run
    from dist_reshard.config.layout import HFLayout, TargetLayout, parse_size

    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases:
        if case.get("dst", "mcore") == "hf":
            layout = HFLayout(max_shard_bytes=parse_size(case.get("max_shard_size", "5GB")), dtype=case.get("dtype"))
        else:
            layout = TargetLayout(tp=case["tp"], pp=case["pp"], vpp=case.get("vpp"), ckpt_format=case["format"],
                                  transformer_impl=case.get("impl", "transformer_engine"), dtype=case.get("dtype"),
                                  ep=case.get("ep", 1), etp=case.get("etp"),
                                  moe_grouped_gemm=case.get("grouped", False),
                                  whole_chunk_bytes=case.get("whole_chunk_bytes", TargetLayout.whole_chunk_bytes),
                                  max_chunk_bytes=case.get("max_chunk_bytes"), first_stage_layers=case.get("first"),
                                  last_stage_layers=case.get("last"))
            if case.get("dst") == "legacy":  # pre-Megatron-Core GPT names (as launch.py sets them)
                layout = dataclasses.replace(layout, ckpt_format="torch", transformer_impl="local", legacy_gpt=True)
        job = run(Options(load=case["load"], save=case["save"], layout=layout, overwrite=True,
                          bucket_bytes=case.get("bucket_bytes", 256 << 20), src=case.get("src", "hf"),
                          hf_config=case.get("hf_config"), vocab_size=case.get("vocab_size"), layer_pattern=case.get("layer_pattern"),
                          device=case.get("device", "auto"), loopback=case.get("loopback", False)))
        if collectives.rank() == 0:
            with open(case["save"] + ".report.json", "w") as f:
                json.dump(job, f, default=str)
    collectives.shutdown()
    sys.stdout.flush()
    os._exit(0)
