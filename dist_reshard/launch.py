"""Command line: `torchrun --nproc-per-node N -m dist_reshard.launch --src hf --dst mcore ...`.

Also `srun python -m dist_reshard.launch ...` (SLURM) and `mpirun -np N python -m dist_reshard.launch ...`
(MPI through mpi4py); see launchers.py.

A thin layer over the Python API (`dist_reshard.convert`, api.py): each rank prints a failing job's error as
the first line of its stderr and exits 1; rank 0 prints the summary and writes the `--report` JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

from .base.errors import ConversionError
from .config.layout import CKPT_FORMATS, DTYPES, TRANSFORMER_IMPLS, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist_reshard.launch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.splitlines()[0], epilog=_EXAMPLES)
    job = p.add_argument_group("the job")
    job.add_argument("--src", choices=["hf", "mcore"], required=True,
                     help="source: hf (a safetensors folder with config.json) or mcore (a Megatron-Core checkpoint, "
                          "torch or torch_dist, any layout; its format and layout are read from its files)")
    job.add_argument("--dst", choices=["mcore", "hf", "legacy"], required=True,
                     help="destination: mcore (Megatron-Core, at the layout below), hf (safetensors), or legacy "
                          "(pre-Megatron-Core GPT names in torch files)")
    job.add_argument("--load", metavar="DIR", required=True,
                     help="source folder (hf: config.json + *.safetensors; mcore: the folder holding "
                          "latest_checkpointed_iteration.txt, or an iter_* folder); never written")
    job.add_argument("--save", metavar="DIR", required=True,
                     help="destination folder; written through a staging folder beside it and moved into place "
                          "only when every rank has finished")

    lay = p.add_argument_group("target layout (--dst mcore / legacy)")
    lay.add_argument("--tp", type=int, metavar="N", default=1, help="tensor-parallel size (default 1)")
    lay.add_argument("--pp", type=int, metavar="N", default=1, help="pipeline-parallel size (default 1)")
    lay.add_argument("--vpp", type=int, metavar="N", default=None,
                     help="virtual pipeline stages per rank (default none; a layout string implies it)")
    lay.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N", default=None,
                     help="uneven split: decoder layers on the first stage (default: an even split)")
    lay.add_argument("--decoder-last-pipeline-num-layers", type=int, metavar="N", default=None,
                     help="uneven split: decoder layers on the last stage (default: an even split)")
    lay.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                     help="count the embedding as a layer of the first stage when splitting (as Megatron-LM; off)")
    lay.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                     help="count the loss as a layer of the last stage when splitting (as Megatron-LM; off)")
    lay.add_argument("--pipeline-model-parallel-layout", metavar="LAYOUT", default=None,
                     help="Megatron-Core's stage layout string, e.g. 'Et*3|(tt|)*29|L' (E embedding, t decoder "
                          "layer, L loss, | between stages; VPP follows from its length); replaces the flags above")
    lay.add_argument("--layer-pattern", metavar="PATTERN", default=None,
                     help="lay a GPT model out as a MambaModel with this pattern of attention (*) and MLP (-) "
                          "layers, e.g. '*-*-'; 'gpt' lays such a model out as a GPTModel again (default: as is)")

    moe = p.add_argument_group("mixture of experts")
    moe.add_argument("--ep", type=int, metavar="N", default=1, help="expert-parallel size (default 1)")
    moe.add_argument("--etp", type=int, metavar="N", default=None,
                     help="expert tensor-parallel size (default: --tp, as Megatron-Core defaults it); legacy files "
                          "need it to divide --tp")
    moe.add_argument("--moe-grouped-gemm", action="store_true",
                     help="legacy format: grouped-GEMM expert names (linear_fc1.weight<i>) instead of "
                          "SequentialMLP's (local_experts.<i>.linear_fc1.weight); off. torch_dist loads either way")
    moe.add_argument("--drop-mtp", action="store_true",
                     help="convert without the multi-token-prediction layers, named in the summary; without it "
                          "DeepSeek-V3's and GLM-4.5's become Megatron-Core's mtp.layers.* (mtp_num_layers), and "
                          "the mtp modules of Qwen3-Next, Qwen3.5 and Ernie-4.5 (not converted) are an error")

    fmt = p.add_argument_group("formats and names")
    fmt.add_argument("--ckpt-format", choices=CKPT_FORMATS, default="torch_dist",
                     help="--dst mcore: torch_dist (default: DCP, loads into any layout) or torch (legacy "
                          "mp_rank_* files, loaded at exactly this layout)")
    fmt.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="transformer_engine",
                     help="parameter names of the TransformerEngine spec (default) or the local spec; must match "
                          "the model that loads the checkpoint")
    fmt.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="output dtype (default: each tensor's source dtype); FP8 and MXFP4 sources are written "
                          "as the bf16 they stand for")
    fmt.add_argument("--make-vocab-size-divisible-by", type=int, metavar="N", default=128,
                     help="--dst mcore: pad the vocabulary to a multiple of this times --tp (default 128, as "
                          "Megatron-LM)")
    fmt.add_argument("--max-shard-size", metavar="SIZE", default="5GB",
                     help="--dst hf: largest safetensors file (default 5GB, as transformers)")
    fmt.add_argument("--hf-config", metavar="HF_DIR", default=None,
                     help="--dst hf: an HF folder whose config.json, generation config and tokenizer files are "
                          "copied and checked against the checkpoint's args (default: config.json from the args)")
    fmt.add_argument("--vocab-size", type=int, metavar="N", default=None,
                     help="--src mcore: the true (unpadded) vocabulary, for checkpoints whose args store only the "
                          "padded one (trained with an HF tokenizer); --hf-config gives it too")

    perf = p.add_argument_group("performance")
    perf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="where the exchange runs: cuda (NCCL, GPU buffers), cpu (gloo); auto (default) picks "
                           "cuda when a GPU is present")
    perf.add_argument("--bucket-mb", type=int, metavar="N", default=256,
                      help="MiB each rank holds in flight per exchange (default 256); lower it when memory is short")
    perf.add_argument("--whole-chunk-mb", type=int, metavar="N", default=64,
                      help="torch_dist: write a tensor of at most this many MiB as one chunk rather than one per TP "
                           "rank (default 64; Megatron reshards on load either way); 0 keeps every TP chunk")
    perf.add_argument("--max-chunk-mb", type=int, metavar="N", default=None,
                      help="torch_dist: cut larger chunks along dim 0 (default: 1/16 of an even share of the model "
                           "per rank, at least 64), so each rank writes close to 1/N of it")
    perf.add_argument("--loopback", action="store_true",
                      help="a check of the exchange: every byte, a rank's own too, goes through the collective "
                           "(on one GPU with --device cuda: NCCL and device buffers); same output, slower; off")

    safety = p.add_argument_group("safety and recovery")
    safety.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --save (moved aside first, removed once the new one is "
                             "in place); off: refused")
    safety.add_argument("--resume", action="store_true",
                        help="after a crash: keep the files a previous run of the same job finished (and whose "
                             "bytes and source still match), redo the rest; off")
    safety.add_argument("--timeout", type=float, metavar="SECONDS", default=1800.0,
                        help="seconds a collective waits for a silent (alive but stuck) peer before every rank gives "
                             "up (default 1800); failures and dead ranks end the job within seconds regardless")
    safety.add_argument("--dry-run", action="store_true",
                        help="plan and print each rank's bytes read, written and in flight; touch no data")

    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="FILE", default=None,
                     help="write the job report as JSON (per-rank bytes read, written, exchanged; peak RSS and GPU "
                          "memory; phase times; what was skipped by name)")
    out.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                     help="rank 0's progress bar: auto (default) shows it when stderr is a terminal")
    out.add_argument("--quiet", action="store_true", help="print nothing on success (no progress bar or summary)")
    return p


_EXAMPLES = """examples:
  torchrun --nproc-per-node 8 -m dist_reshard.launch --src hf --dst mcore \
      --load Llama-3-70B --save ckpt --tp 8 --pp 2               # HF -> Megatron-Core torch_dist
  torchrun --nproc-per-node 8 -m dist_reshard.launch --src mcore --dst hf \
      --load ckpt --save Llama-3-70B-back --hf-config Llama-3-70B  # and back
  torchrun --nproc-per-node 8 -m dist_reshard.launch --src mcore --dst mcore \
      --load ckpt --save ckpt-tp4 --tp 4 --pp 4 --ckpt-format torch  # to another layout and format
python -m dist_reshard.inspect PATH describes a checkpoint; python -m dist_reshard.verify OUT --against SRC checks one.
"""


def _summary(job: dict) -> str:
    mib = 1024 * 1024
    lay = job["layout"]
    into = "HF safetensors" if lay["ckpt_format"] == "hf" else f"TP{lay['tp']} PP{lay['pp']}"
    lines = [f"dist_reshard: {'planned' if job['dry_run'] else 'converted'} {job['source_bytes'] / mib:.1f} MiB "
             f"on {job['world_size']} ranks into {into}"
             + (f" VPP{job['layout']['vpp']}" if job['layout'].get('vpp') else "")
             + (f" EP{job['layout']['ep']}" if job['layout'].get('ep', 1) > 1 else "")
             + (f" ETP{job['layout']['etp']}" if job['layout'].get('etp') else "")
             + "".join(f" {k}={lay[k]!r}" for k in ("first_stage_layers", "last_stage_layers", "embedding_in_split",
                                                    "loss_in_split", "stage_layout") if lay.get(k))
             + (f" {lay['ckpt_format']}" if lay["ckpt_format"] != "hf" else "")]
    for r in job["ranks"]:
        read = r["planned"]["bytes_read"] if job["dry_run"] else r["bytes_read"]
        resident = f", resident <= {r['planned']['resident_bytes'] / mib:.2f} MiB" if job["dry_run"] else ""
        lines.append(f"  rank {r['rank']}: read {read / mib:.2f} MiB{resident}, wrote {r['bytes_written'] / mib:.2f} MiB, "
                     f"peak RSS {r['peak_rss_bytes'] / mib:.0f} MiB, "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in r["phases"].items()))
    if job.get("dropped_mtp_tensors"):
        lines.append(f"  dropped on request (--drop-mtp): {job['dropped_mtp_tensors']} multi-token-prediction tensors")
    if job.get("zero_tensors_left_out"):
        lines.append(f"  left out, checked all zero (Megatron-Core has no place for them): "
                     f"{job['zero_tensors_left_out']} tensors (e.g. Ernie-4.5's expert selection biases)")
    if job.get("mtp_layers"):
        copies = job.get("mtp_shared_copies") or []
        lines.append(f"  multi-token-prediction: {job['mtp_layers']} layers kept (mtp.layers.*)" + (
            f"; their copies {', '.join(copies)} equal the main embedding and head, which Megatron-Core shares "
            f"(compared: {job['mtp_compared_bytes'] / mib:.2f} MiB read)" if copies else ""))
    for name, (count, nbytes) in sorted(job.get("skipped_non_model_state", {}).items()):
        lines.append(f"  skipped (not model state): {name}: {count} entries, {nbytes / mib:.2f} MiB")
    if job.get("read_amplification") is not None:
        lines.append(f"  bytes read / source bytes = {job['read_amplification']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from .api import convert

    try:
        parse_size(ns.max_shard_size)  # a usage error, like argparse's own: exit 2 before any rank starts
    except ConversionError as e:
        sys.stderr.write(f"dist_reshard: error: {e}\n")
        return 2
    flags = vars(ns)
    quiet = flags.pop("quiet")
    if quiet:
        flags["progress"] = "off"
    try:
        job = convert(**flags, command=["dist_reshard.launch", *(argv or sys.argv[1:])])
    except ConversionError as e:
        sys.stderr.write(f"dist_reshard: error: {e}\n")  # one write: ranks' lines never interleave
        sys.stderr.flush()
        return 1
    if int(os.environ.get("RANK", "0")) == 0 and not quiet:  # set by every launcher (launchers.py)
        print(_summary(job), flush=True)
    return 0


def _exit(code: int) -> None:
    """Leave without interpreter teardown: after a torch.distributed.checkpoint save, a C++ thread
    object is sometimes destroyed while joinable at exit and aborts an otherwise finished rank
    (seen with torch 2.13 on gloo). Every file is fsynced and published before this point."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
