"""The Python API: `dist_reshard.convert(...)`, the same job as the command line, from a script or a framework.

    import dist_reshard
    report = dist_reshard.convert(src="hf", dst="mcore", load="Llama-3-8B", save="ckpt", tp=2, pp=2)

Keyword arguments are the command line's flags with dashes as underscores (`--decoder-first-pipeline-num-layers
F` is `decoder_first_pipeline_num_layers=F`), with the same defaults; `python -m dist_reshard.launch --help`
says what each does. Call it on every rank of the job: under torchrun, srun or mpirun each process calls it
once, the ranks plan and exchange together, and every rank gets the job report back.

- A process group already initialised (by torchrun's script, a training framework) is used as it is and left
  initialised afterwards; the exchange goes over its backend (NCCL: GPU buffers, gloo: CPU buffers). Otherwise
  the group is made from the launcher's environment (a plain `python` process is a world of one) and destroyed
  when the job ends, so a script can call `convert` again.
- A failure raises `ConversionError` on every rank, with the same one-line message, and leaves nothing at
  `save` (see the README's reliability section); it never exits the process.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

from .base.errors import ConversionError
from .config.layout import HFLayout, TargetLayout, parse_size
from .plan.data import DEFAULT_BUCKET_BYTES

__all__ = ["convert", "ConversionError"]

SOURCES = ("hf", "mcore")
DESTINATIONS = ("mcore", "hf", "legacy")
_MIB = 1024 * 1024


def convert(*, src: str, dst: str, load: str, save: str,
            tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1, etp: int | None = None,
            decoder_first_pipeline_num_layers: int | None = None, decoder_last_pipeline_num_layers: int | None = None,
            account_for_embedding_in_pipeline_split: bool = False, account_for_loss_in_pipeline_split: bool = False,
            pipeline_model_parallel_layout: str | None = None,
            ckpt_format: str = "torch_dist", transformer_impl: str = "transformer_engine",
            make_vocab_size_divisible_by: int = 128, dtype: str | None = None, max_shard_size: str = "5GB",
            whole_chunk_mb: int = 64, max_chunk_mb: int | None = None,
            moe_grouped_gemm: bool = False, drop_mtp: bool = False, layer_pattern: str | None = None,
            hf_config: str | None = None, vocab_size: int | None = None,
            overwrite: bool = False, resume: bool = False, dry_run: bool = False, timeout: float = 1800.0,
            device: str = "auto", bucket_mb: int = DEFAULT_BUCKET_BYTES // _MIB, loopback: bool = False,
            report: str | None = None, progress: str = "off", command: list[str] | None = None) -> dict:
    """Convert `load` (src: "hf" safetensors or "mcore" Megatron-Core, torch or torch_dist, any layout) into
    `save` (dst: "mcore" at the given layout, "hf", or "legacy" pre-Megatron-Core GPT files). Returns the job
    report (per-rank bytes read, written and exchanged, peak memory, phase times), which `report` also writes
    as JSON on rank 0. Raises ConversionError on every rank when the job fails."""
    call = dict(locals())  # the arguments as given, for the manifest's record of the command
    from .exchange import collectives
    from .run.job import run
    from .run.options import Options

    if src not in SOURCES:
        raise ConversionError(f"src={src!r}: choose one of {', '.join(SOURCES)}")
    if dst not in DESTINATIONS:
        raise ConversionError(f"dst={dst!r}: choose one of {', '.join(DESTINATIONS)}")
    if dst == "hf":
        layout = HFLayout(max_shard_bytes=parse_size(max_shard_size), dtype=dtype)
    else:
        layout = TargetLayout(tp=tp, pp=pp, vpp=vpp, ckpt_format=ckpt_format, transformer_impl=transformer_impl,
                              make_vocab_size_divisible_by=make_vocab_size_divisible_by, dtype=dtype, ep=ep, etp=etp,
                              moe_grouped_gemm=moe_grouped_gemm, whole_chunk_bytes=whole_chunk_mb * _MIB,
                              first_stage_layers=decoder_first_pipeline_num_layers,
                              last_stage_layers=decoder_last_pipeline_num_layers,
                              embedding_in_split=account_for_embedding_in_pipeline_split,
                              loss_in_split=account_for_loss_in_pipeline_split,
                              stage_layout=pipeline_model_parallel_layout,
                              max_chunk_bytes=None if max_chunk_mb is None else max_chunk_mb * _MIB)
        if dst == "legacy":  # the legacy GPT model has one file format and the local layer names
            layout = dataclasses.replace(layout, ckpt_format="torch", transformer_impl="local", legacy_gpt=True)
    opts = Options(load=load, save=save, layout=layout, src=src, hf_config=hf_config, vocab_size=vocab_size,
                   overwrite=overwrite, dry_run=dry_run, drop_mtp=drop_mtp, layer_pattern=layer_pattern,
                   loopback=loopback, device=device, bucket_bytes=bucket_mb * _MIB, report=report, resume=resume,
                   timeout_s=timeout, progress=progress,
                   command=command or _command(call))
    owned = not collectives.initialized()
    try:
        job = run(opts)
    except ConversionError as e:
        collectives.shutdown(e, destroy=owned)
        raise
    if report and collectives.rank() == 0:
        with open(report, "w") as f:
            json.dump(job, f, indent=2, default=str)
    collectives.shutdown(destroy=owned)
    return job


def _command(call: dict) -> list[str]:
    """`convert`'s call as the manifest records it: the arguments given other than their defaults."""
    defaults = {k: p.default for k, p in inspect.signature(convert).parameters.items()}
    return ["dist_reshard.convert", *(f"{k}={v!r}" for k, v in call.items()
                                      if k != "command" and v != defaults.get(k, inspect.Parameter.empty))]
