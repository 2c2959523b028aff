"""The baseline the benchmark compares against: how converters without a plan shard a checkpoint.

    torchrun --standalone --nproc-per-node N bench/full_tensor_worker.py --load SRC --save DST \
        --tp 2 --pp 2 --report R.json [--dry-run]

Each rank owns the (tp, pp) output files round-robin (file u = pp * TP + tp goes to rank u % N), opens
every safetensors file with `safetensors.safe_open(..., framework="pt")`, pulls each tensor one of its
files needs *whole* with `get_tensor`, cuts its TP slices locally (dim 0 for q/k/v, gate/up, experts'
w1/w3, embeddings and the head; dim 1 for o_proj, down_proj and experts' w2; norms and the router whole),
and `torch.save`s one file per (tp, pp) it owns, fsynced. No fused QKV and no vocabulary padding: the
baseline is meant to cost what the reading and writing cost, not to be a correct Megatron checkpoint.

"bytes read" is what get_tensor handed over (numel x element size of whole tensors), counted once per
tensor per rank: with N ranks sharing the PP stages' tensors, the same bytes are pulled by several ranks.
Rank 0 writes a report shaped like dist_reshard's (`ranks[*].bytes_read`, `peak_rss_bytes`, `phases`,
top-level `source_bytes`, `bytes_read_total`, `read_amplification`). `--dry-run` stops after the process
group is up: the start-up cost, subtracted by bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time

import torch
import torch.distributed as dist
from safetensors import safe_open

COLUMN = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias",
          "gate_proj.weight", "up_proj.weight", "w1.weight", "w3.weight", "embed_tokens.weight", "lm_head.weight")
ROW = ("o_proj.weight", "down_proj.weight", "w2.weight")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def stage_of(name: str, layers: int, pp: int) -> int:
    """The pipeline stage that holds this tensor (layers split evenly; embedding first, head last)."""
    m = LAYER.match(name)
    if m:
        return int(m.group(1)) // (layers // pp)
    return 0 if name.startswith("model.embed_tokens") else pp - 1


def tp_slice(name: str, t: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part, as its own storage: torch.save of a view would save the whole tensor."""
    if name.endswith(COLUMN):
        t = t.chunk(tp, dim=0)[tp_rank]
    elif name.endswith(ROW):
        t = t.chunk(tp, dim=1)[tp_rank]
    return t.clone(memory_format=torch.contiguous_format)


def source_files(folder: str) -> tuple[list[str], int]:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    return sorted(set(index["weight_map"].values())), int(index["metadata"]["total_size"])


def convert(load: str, save: str, tp: int, pp: int, rank: int, world: int) -> dict:
    """This rank's share; returns its report entry."""
    with open(os.path.join(load, "config.json")) as f:
        layers = json.load(f)["num_hidden_layers"]
    units = [(t, p) for p in range(pp) for t in range(tp)]
    mine = units[rank::world]
    shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {u: {} for u in mine}
    phases = {"read": 0.0, "slice": 0.0, "write": 0.0}
    bytes_read = 0
    files, _ = source_files(load)
    for fname in files:
        with safe_open(os.path.join(load, fname), framework="pt") as f:
            for name in f.keys():
                owners = [u for u in mine if u[1] == stage_of(name, layers, pp)]
                if not owners:
                    continue
                t0 = time.perf_counter()
                whole = f.get_tensor(name)
                t1 = time.perf_counter()
                bytes_read += whole.numel() * whole.element_size()
                for u in owners:
                    shards[u][name] = tp_slice(name, whole, u[0], tp)
                del whole
                phases["read"] += t1 - t0
                phases["slice"] += time.perf_counter() - t1
    t0 = time.perf_counter()
    written = 0
    for tp_rank, pp_rank in mine:
        path = os.path.join(save, "iter_0000001", f"mp_rank_{tp_rank:02d}_{pp_rank:03d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            torch.save({"model": shards.pop((tp_rank, pp_rank))}, f)
            f.flush()
            os.fsync(f.fileno())
        written += os.path.getsize(path)
    phases["write"] = time.perf_counter() - t0
    return {"rank": rank, "bytes_read": bytes_read, "bytes_written": written, "phases": phases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--report", default=None)
    p.add_argument("--dry-run", action="store_true", help="start the process group and stop (start-up cost)")
    ns = p.parse_args()
    dist.init_process_group("gloo")  # as the peers do; also gives the report a gather
    rank, world = dist.get_rank(), dist.get_world_size()
    if ns.dry_run:
        entry = {"rank": rank, "bytes_read": 0, "bytes_written": 0, "phases": {}}
    else:
        entry = convert(ns.load, ns.save, ns.tp, ns.pp, rank, world)
    entry["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    everyone = [None] * world
    dist.all_gather_object(everyone, entry)
    if rank == 0 and ns.report:
        _, source_bytes = source_files(ns.load)
        total = sum(e["bytes_read"] for e in everyone)
        with open(ns.report, "w") as f:
            json.dump({"dry_run": ns.dry_run, "world_size": world, "layout": {"tp": ns.tp, "pp": ns.pp},
                       "source_bytes": source_bytes, "bytes_read_total": total,
                       "read_amplification": None if ns.dry_run else total / source_bytes, "ranks": everyone},
                      f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
