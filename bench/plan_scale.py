"""How long the planner takes for the largest published shapes, and how evenly it shares the work.

Headers-only indexes (tests/synthetic.py: Llama-3.1-405B in bf16, DeepSeek-V3-671B as published in FP8 with
its block scales and its multi-token-prediction layer 61, kept) planned for hundreds of simulated ranks in one
process, as `--dry-run` does on every rank.
Prints, per case, the planning time (wall and CPU), the plan's size, the largest read and resident bytes
of any rank against 1/N, how far the resident bytes exceed 1/N and how much of that is the in-flight bucket
(reads and exchanges; bounded by --bucket-mb), the largest single read slice, and whether the busiest rank's
reads are within 1/N plus that slice. Nothing is read; the MTP layers' copies of the embedding and head are
compared with the main ones at job start (source/mtp_copies.py), outside the plan: `copy check MiB` is what
that adds to each rank's reads (both sides of every copy, the rows split over N ranks).

    .venv/bin/python bench/plan_scale.py [--worlds 256,1024] [--out plan_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from dist_reshard.families import family_for  # noqa: E402
from dist_reshard.config.layout import TargetLayout  # noqa: E402
from dist_reshard.plan.planner import make_plan  # noqa: E402
from dist_reshard.source.mtp_copies import shared_copies  # noqa: E402
from synthetic import DEEPSEEK_PP16_LAYOUT, DEEPSEEK_VPP2_LAYOUT, LLAMA_405B, deepseek_v3, synthetic  # noqa: E402

CASES = {
    "llama-405b tp8 pp14 torch": (lambda: synthetic(LLAMA_405B), dict(tp=8, pp=14, ckpt_format="torch")),
    "llama-405b tp8 pp14 torch_dist": (lambda: synthetic(LLAMA_405B), dict(tp=8, pp=14, ckpt_format="torch_dist")),
    "deepseek-v3-671b-fp8 tp8 ep32 torch_dist": (deepseek_v3, dict(tp=8, pp=1, ep=32, ckpt_format="torch_dist")),
    # Legacy files repeat every dense TP shard in each of the 32 EP files: 32x the transfers of torch_dist.
    "deepseek-v3-671b-fp8 tp8 ep32 torch": (deepseek_v3, dict(tp=8, pp=1, ep=32, ckpt_format="torch")),
    # As trained: 405B's 126 layers at PP16 with the embedding and the loss counted as layers (7 | 8 x 14 | 7).
    "llama-405b tp8 pp16 emb+loss torch": (lambda: synthetic(LLAMA_405B), dict(
        tp=8, pp=16, ckpt_format="torch", embedding_in_split=True, loss_in_split=True)),
    "llama-405b tp8 pp16 emb+loss torch_dist": (lambda: synthetic(LLAMA_405B), dict(
        tp=8, pp=16, ckpt_format="torch_dist", embedding_in_split=True, loss_in_split=True)),
    # 671B's 61 layers and its MTP layer at PP16 x EP32 by layout strings: DeepSeek's VPP2 layout (the MTP layer
    # alone in pipeline rank 14's second virtual stage) in both formats, and 3 | 4 x 14 | 2 + MTP without VPP.
    "deepseek-v3-671b-fp8 tp8 pp16 ep32 layout torch_dist": (deepseek_v3, dict(
        tp=8, pp=16, ep=32, ckpt_format="torch_dist", stage_layout=DEEPSEEK_VPP2_LAYOUT)),
    "deepseek-v3-671b-fp8 tp8 pp16 ep32 layout torch": (deepseek_v3, dict(
        tp=8, pp=16, ep=32, ckpt_format="torch", stage_layout=DEEPSEEK_VPP2_LAYOUT)),
    "deepseek-v3-671b-fp8 tp8 pp16 ep32 no-vpp torch": (deepseek_v3, dict(
        tp=8, pp=16, ep=32, ckpt_format="torch", stage_layout=DEEPSEEK_PP16_LAYOUT)),
}


def measure(name: str, world: int) -> dict:
    make_index, layout = CASES[name]
    config, index = make_index()
    family = family_for(config.architecture)
    wall, cpu = time.perf_counter(), time.process_time()
    plan = make_plan(family, index, config, TargetLayout(**layout), world)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    acc = plan.accounting()
    written = sum(u.nbytes for u in plan.units)
    return dict(case=name, world=world, plan_wall_s=round(wall, 2), plan_cpu_s=round(cpu, 2),
                targets=len(plan.targets), read_items=len(plan.items), transfers=plan.transfer_count, fanouts=len(plan.fanouts),
                source_bytes=plan.source_bytes, written_bytes=written,
                max_read_over_share=max(a["bytes_read"] for a in acc) * world / plan.source_bytes,
                max_resident_over_share=max(a["resident_bytes"] for a in acc) * world / written,
                max_resident_excess_bytes=max(a["resident_bytes"] for a in acc) - written // world,
                max_bucket_bytes=max(a["peak_bucket_bytes"] for a in acc),
                largest_slice_bytes=plan.largest_item_bytes, mtp_layers=config.mtp_layers,
                copy_check_bytes_per_rank=-(-sum(2 * index[copy].nbytes for copy, _ in shared_copies(family, config))
                                            // world),
                reads_within_share_plus_slice=max(a["bytes_read"] for a in acc)
                <= plan.source_bytes / world + plan.largest_item_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="256,1024")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    ns = p.parse_args()
    rows = []
    print(f"{'case':42s} {'N':>5s} {'wall s':>7s} {'cpu s':>6s} {'targets':>8s} {'items':>7s} "
          f"{'read/(1/N)':>10s} {'resident/(1/N)':>14s} {'over 1/N MiB':>12s} {'of it bucket':>12s} "
          f"{'largest slice MiB':>17s} {'<= 1/N+slice':>12s} {'copy check MiB':>14s}")
    for name in ns.cases.split(","):
        for world in (int(w) for w in ns.worlds.split(",")):
            r = measure(name, world)
            rows.append(r)
            print(f"{name:42s} {world:5d} {r['plan_wall_s']:7.2f} {r['plan_cpu_s']:6.2f} {r['targets']:8d} "
                  f"{r['read_items']:7d} {r['max_read_over_share']:10.3f} {r['max_resident_over_share']:14.3f} "
                  f"{r['max_resident_excess_bytes'] / 2**20:12.0f} {r['max_bucket_bytes'] / 2**20:12.0f} "
                  f"{r['largest_slice_bytes'] / 2**20:17.1f} {str(r['reads_within_share_plus_slice']):>12s} "
                  f"{r['copy_check_bytes_per_rank'] / 2**20:14.1f}", flush=True)
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
