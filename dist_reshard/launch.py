"""Command line: `torchrun --nproc-per-node N -m dist_reshard.launch --src hf --dst mcore ...`.

Also `srun python -m dist_reshard.launch ...` (SLURM) and `mpirun -np N python -m dist_reshard.launch ...`
(MPI through mpi4py); see launchers.py.

Each rank prints a failing job's error as the first line of its stderr and exits 1; rank 0 prints the
summary and writes the `--report` JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import ConversionError
from .layout import CKPT_FORMATS, DTYPES, TRANSFORMER_IMPLS, TargetLayout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist_reshard.launch", description=__doc__.splitlines()[0])
    p.add_argument("--src", choices=["hf", "mcore"], required=True,
                   help="source format: HF safetensors, or a Megatron-Core checkpoint (torch or torch_dist, "
                        "any layout; detected from its files)")
    p.add_argument("--dst", choices=["mcore", "hf", "legacy"], required=True,
                   help="destination format (legacy: Megatron-LM's pre-Megatron-Core GPT names, torch files)")
    p.add_argument("--load", required=True,
                   help="source folder (HF: config.json + *.safetensors; mcore: the folder holding "
                        "latest_checkpointed_iteration.txt or an iter_* folder)")
    p.add_argument("--max-shard-size", default="5GB", help="--dst hf: largest safetensors file (as transformers)")
    p.add_argument("--hf-config", default=None,
                   help="--dst hf: take config.json, generation config and tokenizer files from this HF folder")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--src mcore: the true (unpadded) vocabulary size, for checkpoints whose args store only the "
                        "padded one (trained with an HF tokenizer); --hf-config's vocab_size gives it too")
    p.add_argument("--save", required=True, help="destination folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="--dst mcore: decoder layers on the first pipeline stage (uneven split, as Megatron-LM)")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="--dst mcore: decoder layers on the last pipeline stage (uneven split, as Megatron-LM)")
    p.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="--dst mcore: count the embedding as a layer of the first stage when splitting (Megatron-LM)")
    p.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="--dst mcore: count the loss as a layer of the last stage when splitting (Megatron-LM)")
    p.add_argument("--pipeline-model-parallel-layout", default=None,
                   help="--dst mcore: Megatron-Core's layout string, e.g. 'Et*3|(tt|)*29|L' (E embedding, t decoder "
                        "layer, L loss, | between stages; VPP stages follow from its length)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--etp", type=int, default=None,
                   help="expert tensor-parallel size (default: --tp, as Megatron-Core defaults it)")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="legacy format: grouped-GEMM expert names (linear_fc1.weight<i>) instead of SequentialMLP's")
    p.add_argument("--drop-mtp", action="store_true",
                   help="DeepSeek-V3, GLM-4.5: convert without the multi-token-prediction layers stored after the "
                        "decoder (model.layers.<num_hidden_layers>.*); without this flag they become Megatron-Core's "
                        "mtp.layers.* (mtp_num_layers)")
    p.add_argument("--layer-pattern", default=None,
                   help="--dst mcore: lay a GPT model out as a MambaModel with this pattern of attention (*) and MLP "
                        "(-) layers, e.g. '*-*-'; 'gpt' lays such a model out as a GPTModel again")
    p.add_argument("--ckpt-format", choices=CKPT_FORMATS, default="torch_dist")
    p.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="transformer_engine",
                   help="parameter naming: TransformerEngine spec (default) or local spec")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--whole-chunk-mb", type=int, default=64,
                   help="torch_dist: write a tensor of at most this many MiB as one chunk rather than one per TP "
                        "rank (Megatron reshards on load either way); 0 keeps every TP chunk")
    p.add_argument("--max-chunk-mb", type=int, default=None,
                   help="torch_dist: cut larger chunks along dim 0 (default: 1/16 of an even share of the model "
                        "per rank, at least 64), so each rank writes close to 1/N of it")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: source dtype)")
    p.add_argument("--report", default=None, help="write a JSON report (per-rank bytes, RSS, phase times)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--dry-run", action="store_true", help="plan and account only; touch no data")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="exchange on the GPU with NCCL (auto when CUDA is present) or on the CPU with gloo")
    p.add_argument("--loopback", action="store_true",
                   help="a check of the exchange: send every byte, a rank's own too, through the collective (on "
                        "one GPU with --device cuda: NCCL and device buffers) instead of copying it locally; "
                        "same output, slower")
    p.add_argument("--bucket-mb", type=int, default=256, help="bytes in flight per rank per exchange (MiB)")
    p.add_argument("--resume", action="store_true",
                   help="after a crash: keep the files a previous run of the same command finished, redo the rest")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a collective may wait for a silent peer before every rank gives up")
    p.add_argument("--quiet", action="store_true", help="print nothing on success (no progress bar either)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="rank 0's progress bar: auto shows it when stderr is a terminal")
    return p


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
    from . import collectives
    from .convert import Options, run

    layout = TargetLayout(tp=ns.tp, pp=ns.pp, vpp=ns.vpp, ckpt_format=ns.ckpt_format,
                          transformer_impl=ns.transformer_impl,
                          make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by, dtype=ns.dtype,
                          ep=ns.ep, etp=ns.etp, moe_grouped_gemm=ns.moe_grouped_gemm,
                          whole_chunk_bytes=ns.whole_chunk_mb << 20,
                          first_stage_layers=ns.decoder_first_pipeline_num_layers,
                          last_stage_layers=ns.decoder_last_pipeline_num_layers,
                          embedding_in_split=ns.account_for_embedding_in_pipeline_split,
                          loss_in_split=ns.account_for_loss_in_pipeline_split,
                          stage_layout=ns.pipeline_model_parallel_layout,
                          max_chunk_bytes=None if ns.max_chunk_mb is None else ns.max_chunk_mb << 20)
    if ns.dst == "legacy":  # the legacy GPT model has one file format and the local layer names
        layout = dataclasses.replace(layout, ckpt_format="torch", transformer_impl="local", legacy_gpt=True)
    if ns.dst == "hf":
        from .layout import HFLayout, parse_size

        try:
            layout = HFLayout(max_shard_bytes=parse_size(ns.max_shard_size), dtype=ns.dtype)
        except ConversionError as e:
            sys.stderr.write(f"dist_reshard: error: {e}\n")
            return 2
    opts = Options(load=ns.load, save=ns.save, layout=layout, src=ns.src, hf_config=ns.hf_config, vocab_size=ns.vocab_size, overwrite=ns.overwrite, dry_run=ns.dry_run, drop_mtp=ns.drop_mtp, layer_pattern=ns.layer_pattern, loopback=ns.loopback,
                   device=ns.device, bucket_bytes=ns.bucket_mb * 1024 * 1024, report=ns.report,
                   resume=ns.resume, timeout_s=ns.timeout, progress="off" if ns.quiet else ns.progress, command=["dist_reshard.launch", *(argv or sys.argv[1:])])
    try:
        job = run(opts)
    except ConversionError as e:
        sys.stderr.write(f"dist_reshard: error: {e}\n")  # one write: ranks' lines never interleave
        sys.stderr.flush()
        collectives.shutdown(e)
        return 1
    if collectives.rank() == 0:
        if ns.report:
            with open(ns.report, "w") as f:
                json.dump(job, f, indent=2, default=str)
        if not ns.quiet:
            print(_summary(job), flush=True)
    collectives.shutdown()
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
