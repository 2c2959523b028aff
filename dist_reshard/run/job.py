"""One rank's run of a conversion: plan, then the data loop, then publish.

Every phase ends in `collectives.agree`, so an error on any rank (bad input, a short read, a full
disk) ends every rank together with the same first line, and the output is published only after all
ranks have written: ranks write into a staging folder beside `--save` that rank 0 renames into place.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time

import torch

from ..base.version import VERSION as __version__
from ..exchange import collectives
from . import destination
from ..base import faults
from ..formats import manifest
from .destination import staging_path
from ..base.errors import ConversionError
from ..source.hf_source import mtp_tensors, open_hf_folder
from ..plan.data import Plan, RankPlan
from ..plan.planner import make_plan
from ..writers import legacy
from .options import ITERATION_DIR, Options, RankReport, dcp_files
from .outputs import write_hf_metadata
from .data_loop import move_data


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _plan(opts: Options, skip_paths: frozenset = frozenset()) -> tuple[Plan, object, object, dict, object, dict]:
    """(plan, config, family, HF-named index, Megatron source or None, the multi-token-prediction summary: tensors
    dropped on request, layers kept, the copies of shared tensors compared and the bytes that took).
    With a Megatron source the index holds its logical HF tensors and the plan reads the shards or chunks
    that store them."""
    source, mtp = None, {"dropped": 0}
    if opts.layout.ckpt_format == "hf" and opts.src != "mcore":
        raise ConversionError(f"--src {opts.src} --dst hf: the source is already HF safetensors")
    if opts.src == "mcore":
        from ..source.megatron_source import open_source, true_vocab_known

        reference = None
        if opts.hf_config:
            from ..config.hf_config import read_config

            reference = read_config(opts.hf_config)
        source = open_source(opts.load, opts.vocab_size, reference)
        if opts.layout.ckpt_format == "hf" and not (reference or true_vocab_known(source, opts.vocab_size)):
            raise ConversionError(f"--load {opts.load}: the checkpoint stores only the padded vocabulary "
                                  f"(args.padded_vocab_size = {source.args.padded_vocab_size}, no true_vocab_size or "
                                  f"vocab_size: trained with an HF tokenizer); pass --hf-config HF_DIR or --vocab-size "
                                  f"N so that the HF model gets exactly the tokenizer's rows")
        cfg, family, index = source.config, source.family, source.logical
    else:
        cfg, family, index = open_hf_folder(opts.load, count_mtp=not opts.drop_mtp)
        stored_mtp = mtp_tensors(index, cfg, family)
        if stored_mtp and opts.drop_mtp:
            index = {n: t for n, t in index.items() if n not in stored_mtp}
            mtp = {"dropped": len(stored_mtp)}
        elif cfg.mtp_layers:
            from ..source.mtp_copies import check_shared_copies, shared_copies

            pairs = shared_copies(family, cfg)
            mtp = {"dropped": 0, "kept_layers": cfg.mtp_layers, "shared_copies": [c for c, _ in pairs],
                   "compared_bytes": check_shared_copies(index, pairs, collectives.rank(), collectives.world())}
    if opts.layer_pattern:
        from ..families.gpt_hybrid import relayout

        cfg, family = relayout(cfg, family, opts.layer_pattern)
    if getattr(opts.layout, "legacy_gpt", False):
        from ..families.legacy_gpt import check_target

        check_target(family, cfg)
    plan = make_plan(family, index, cfg, opts.layout, collectives.world(), bucket_bytes=opts.bucket_bytes,
                     skip_paths=skip_paths, source=source)
    if source is not None and cfg.mtp_layers:
        mtp = {"dropped": 0, "kept_layers": cfg.mtp_layers}
    return plan, cfg, family, index, source, mtp


def _source_files(index: dict, source=None) -> list[str]:
    return source.files if source is not None else sorted({t.file for t in index.values()})


def _job_identity(opts: Options, source_files: list[str]) -> dict:
    identity = {"tool": "dist_reshard", "version": __version__, "source": manifest.source_fingerprint(source_files),
                "layout": dict(opts.layout.__dict__), "world_size": collectives.world()}
    if opts.layer_pattern:  # a GPT model laid out as a MambaModel (or back): part of what the output is
        identity["layer_pattern"] = opts.layer_pattern
    return identity


def run(opts: Options) -> dict:
    """Run this rank's part of the job; returns the job report (complete on rank 0)."""
    parent = os.getppid()  # under torchrun, its agent: gone before publishing means the job was stopped
    device = collectives.init(opts.device, opts.timeout_s)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the report's peak is this job's (one process may run several)
    me = collectives.rank()
    report = RankReport(me)
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.phases[name] = report.phases.get(name, 0.0) + (now - clock)
        clock = now

    err: BaseException | None = None
    plan = view = cfg = family = index = identity = source = source_files = None
    mtp = {"dropped": 0}
    try:
        destination.check_paths(opts.save, opts.load)
        plan, cfg, family, index, source, mtp = _plan(opts)
        # Every path the source resolves through (a symlinked shard's real file too) is out of reach.
        source_files = _source_files(index, source)
        destination.check_paths(opts.save, opts.load, source_files)
        destination.check_destination(opts.save, opts.overwrite)
        view = plan.rank_view(me)
        identity = _job_identity(opts, source_files)
    except ConversionError as e:
        err = e
    collectives.agree(err, device)
    phase("plan")
    report.bytes_planned = view.bytes_read
    if opts.dry_run:
        return _finish(report, plan, opts, dry_run=True, mtp=mtp, source=source)

    lock = destination.DestinationLock(opts.save) if me == 0 else None
    try:
        staging = staging_path(opts.save)
        key = manifest.job_key(identity)
        err, done = None, {}
        try:
            if me == 0:
                lock.acquire()  # before anything beside --save is touched: another job's staging is its own
                if os.path.exists(staging) and not opts.resume:
                    shutil.rmtree(staging)  # left by a killed run; never the user's --save
                os.makedirs(staging if opts.layout.ckpt_format == "hf" else os.path.join(staging, ITERATION_DIR),
                            exist_ok=True)
                # Resume keeps a finished file only while the source files are the very ones it was made from.
                changed = manifest.source_changed(staging, source_files) if opts.resume else None
                if changed:
                    sys.stderr.write(f"dist_reshard: --resume: {changed}; every file is made again\n")
                done = manifest.completed(staging, key) if opts.resume and not changed else {}
                manifest.record_source(staging, source_files)
        except ConversionError as e:
            err = e
        except OSError as e:
            err = ConversionError(f"--save {opts.save}: cannot create staging folder {staging} ({e.strerror})")
        collectives.agree(err, device)
        done = collectives.broadcast_object(done)
        if done:
            # Resume: only the files not already complete are planned, read and written again.
            if opts.layout.ckpt_format in ("torch", "hf"):
                plan = make_plan(family, index, cfg, opts.layout, collectives.world(), bucket_bytes=opts.bucket_bytes,
                                 skip_paths=frozenset(done), source=source)
                view = plan.rank_view(me)
            elif not all(f in done for f in dcp_files(collectives.world())):
                done = {}  # DCP writes its files in one collective: redo them together
        try:
            records, write_err, args = move_data(opts, plan, view, cfg, family, source.stored if source else index,
                                                 staging, report, phase, device, key, done, source=source)
            _publish(opts, plan, view, cfg, family, source, staging, records, write_err, args, device, done, identity,
                     source_files, phase, parent)
        except ConversionError:
            if me == 0:
                shutil.rmtree(staging, ignore_errors=True)  # bad input or a full disk: nothing to resume
            raise
        except Exception as e:
            # A peer died or a collective broke: keep the finished files for --resume.
            raise ConversionError(f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                  f"(finished files kept in {staging}; rerun with --resume)") from e
        return _finish(report, plan, opts, dry_run=False, mtp=mtp, source=source)

    finally:
        if lock is not None:
            lock.release()


def _publish(opts: Options, plan: Plan, view: RankPlan, cfg, family, source, staging: str, records: list[dict],
             err: BaseException | None, args, device, done: dict, identity: dict, source_files: list[str], phase,
             parent: int) -> None:
    """Every rank's files agreed on and gathered; rank 0 writes the manifest and moves the staging folder into
    place (its failure agreed on too, so no peer waits for it)."""
    me = view.rank
    hf_out = opts.layout.ckpt_format == "hf"
    try:
        faults.maybe_fail(me, "publish")
    except Exception as e:  # noqa: BLE001 - agreed on below
        err = err or e
    # A rank whose launcher was killed is an orphan: the job was stopped, nothing may appear at --save.
    orphaned = destination.launcher_gone(parent)
    if err is None and orphaned:
        err = ConversionError(orphaned)
    collectives.agree(err, device)
    everything = collectives.gather_objects(records)
    err = None
    if me == 0:
        try:
            files = {r["path"]: r for rank_records in everything for r in rank_records}
            files.update({p: r for p, r in done.items() if p not in files})
            extra = write_hf_metadata(opts, plan, cfg, family, source, staging) if hf_out else [
                legacy.write_tracker(staging, args.iteration) or "latest_checkpointed_iteration.txt"]
            for name in extra:
                files[name] = dict(manifest.file_digest(os.path.join(staging, name)), path=name)
            manifest.write_manifest(staging, {
                "tool": "dist_reshard", "version": __version__, "command": opts.command,
                "source": identity["source"], "source_folder": os.path.abspath(opts.load),
                "family": family.name, "layout": identity["layout"], "world_size": plan.world,
                "padded_vocab_size": plan.padded_vocab, "true_vocab_size": cfg.vocab_size,
                **({"layer_pattern": opts.layer_pattern} if opts.layer_pattern else {}),
                "files": [{k: r[k] for k in ("path", "size", manifest.FILE_HASH)} for _, r in sorted(files.items())],
            })
            shutil.rmtree(os.path.join(staging, manifest.JOURNAL_DIR), ignore_errors=True)
            why = destination.launcher_gone(parent)
            if why:
                raise ConversionError(why)
            destination.publish(opts.save, staging, opts.overwrite, opts.load, source_files)
        except OSError as e:
            err = ConversionError(f"--save {opts.save}: cannot publish the checkpoint ({e.strerror})")
        except Exception as e:  # noqa: BLE001 - rank 0's failure alone: agreed on, so no peer waits for it
            err = e
    collectives.agree(err, device)
    phase("publish")


def _finish(report: RankReport, plan: Plan, opts: Options, dry_run: bool, mtp: dict | None = None,
            source=None) -> dict:
    report.peak_rss_bytes = _peak_rss()
    report.mtp_compared_bytes = (mtp or {}).get("compared_bytes", 0)
    if torch.cuda.is_initialized():
        report.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    reports = collectives.gather_objects(report.__dict__)
    acc = plan.accounting()
    job = {
        "dry_run": dry_run,
        "world_size": plan.world,
        "layout": opts.layout.__dict__,
        "source_bytes": plan.source_bytes,
        "padded_vocab_size": plan.padded_vocab,
        "targets": len(plan.targets),
        "read_items": len(plan.items),
        "transfers": plan.transfer_count,
        "buckets": len(plan.buckets),
        "largest_read_item_bytes": plan.largest_item_bytes,
        "dropped_mtp_tensors": (mtp or {}).get("dropped", 0),
        # Multi-token-prediction layers kept, the MTP layers' copies of shared tensors compared (HF source).
        "mtp_layers": (mtp or {}).get("kept_layers", 0),
        "mtp_shared_copies": (mtp or {}).get("shared_copies", []),
        "mtp_compared_bytes": sum(r["mtp_compared_bytes"] for r in reports),
        # Source tensors Megatron-Core has no place for, read and found all zero (source/zero_tensors.py).
        "zero_tensors_left_out": plan.zeros_left_out,
        # A Megatron source's training state, left out by name: {name: [entries, bytes]}.
        "skipped_non_model_state": dict(source.skipped) if source is not None else {},
        "ranks": [dict(r, planned=a) for r, a in zip(reports, acc)],
    }
    total_read = sum(r["bytes_read"] for r in reports)
    job["bytes_read_total"] = total_read
    job["read_amplification"] = (total_read / plan.source_bytes) if plan.source_bytes and not dry_run else None
    return job
