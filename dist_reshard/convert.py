"""One rank's run of an HF -> Megatron-Core conversion: plan, read, exchange, write, publish.

Every phase ends in `collectives.agree`, so an error on any rank (bad input, a short read, a full
disk) ends every rank together with the same first line, and the output is published only after all
ranks have written: ranks write into a staging folder beside `--save` that rank 0 renames into place.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import dataclass, field

import torch

from . import __version__, collectives, faults, manifest
from .errors import ConversionError
from .families import family_for
from .hf_config import read_config
from .layout import TargetLayout
from .megatron_args import megatron_args
from .rank_plan import DEFAULT_BUCKET_BYTES, Plan, RankPlan, Target, make_plan
from .reader import RangeReader
from .safetensors_index import DTYPE_SIZES, index_folder
from .writers import legacy, torch_dist
from .dtypes import TORCH_DTYPES

ITERATION_DIR = "iter_0000001"


@dataclass
class Options:
    load: str
    save: str
    layout: TargetLayout
    overwrite: bool = False
    dry_run: bool = False
    device: str = "auto"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    report: str | None = None
    resume: bool = False
    timeout_s: float = 1800.0
    command: list | None = None
    progress: str = "auto"  # "auto" (a bar when rank 0's stderr is a terminal), "on", "off"


@dataclass
class RankReport:
    rank: int
    bytes_read: int = 0
    bytes_planned: int = 0
    bytes_written: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    peak_rss_bytes: int = 0
    phases: dict = field(default_factory=dict)


def staging_path(save: str) -> str:
    save = os.path.abspath(save)
    return os.path.join(os.path.dirname(save), f".{os.path.basename(save)}.dist_reshard-staging")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _check_destination(opts: Options) -> None:
    if os.path.exists(opts.save):
        if not os.path.isdir(opts.save):
            raise ConversionError(f"--save {opts.save}: exists and is not a directory")
        if os.listdir(opts.save) and not opts.overwrite:
            raise ConversionError(f"--save {opts.save}: exists and is not empty; pass --overwrite to replace it")
    if os.path.abspath(opts.save) == os.path.abspath(opts.load):
        raise ConversionError(f"--save {opts.save}: is the --load folder")


def _plan(opts: Options) -> tuple[Plan, object, object, dict]:
    cfg = read_config(opts.load)
    family = family_for(cfg.architecture, os.path.join(opts.load, "config.json"))
    index = index_folder(opts.load)
    plan = make_plan(family, index, cfg, opts.layout, collectives.world(), bucket_bytes=opts.bucket_bytes)
    return plan, cfg, family, index


def _job_identity(opts: Options, index: dict) -> dict:
    files = sorted({t.file for t in index.values()})
    return {"tool": "dist_reshard", "version": __version__, "source": manifest.source_fingerprint(files),
            "layout": dict(opts.layout.__dict__), "world_size": collectives.world()}


def _dcp_files(world: int) -> list[str]:
    names = [f"__{r}_0.distcp" for r in range(world)] + [".metadata", "common.pt", "metadata.json"]
    return [f"{ITERATION_DIR}/{n}" for n in names]


def _allocate(targets: list[Target]) -> dict[int, torch.Tensor]:
    out = {}
    for t in targets:
        dtype = TORCH_DTYPES[t.dtype]
        out[t.index] = torch.zeros(t.shape, dtype=dtype) if t.padded else torch.empty(t.shape, dtype=dtype)
    return out


def _pack(data: dict[int, torch.Tensor], transfers, items, source_dtype: dict[str, str]) -> torch.Tensor:
    """Concatenate the transfers' bytes in wire order; column slices are made contiguous first (a view
    along dim 1 handed to gloo would send the underlying memory, not the slice)."""
    parts = []
    for t in transfers:
        item = items[t.item]
        nrows = item.rows[1] - item.rows[0]
        block = data[t.item].view(nrows, item.nbytes // nrows)[t.rows[0] - item.rows[0]:t.rows[1] - item.rows[0]]
        if t.cols is not None:
            itemsize = DTYPE_SIZES[source_dtype[item.source]]
            block = block[:, t.cols[0] * itemsize:t.cols[1] * itemsize]
        parts.append(block.contiguous().view(-1))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _unpack(buf: torch.Tensor, transfers, tensors: dict[int, torch.Tensor], targets: dict[int, Target],
            source_dtype: dict[str, str], items) -> None:
    pos = 0
    for t in transfers:
        raw = buf[pos:pos + t.nbytes]
        pos += t.nbytes
        item = items[t.item]
        rows = t.rows[1] - t.rows[0]
        values = raw.view(TORCH_DTYPES[source_dtype[item.source]]).view(rows, -1)
        target = targets[t.target]
        dst = tensors[t.target].view(target.rows, -1)
        dst[t.dst_row:t.dst_row + rows].copy_(values)  # the cast to --dtype happens here, per slice


def _progress_bar(opts: Options, plan: Plan):
    """One bar on rank 0: bytes read and exchanged over all ranks, with throughput and ETA."""
    if opts.progress == "off":
        return None
    from tqdm import tqdm

    return tqdm(total=plan.source_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="dist_reshard",
                disable=None if opts.progress == "auto" else False, mininterval=0.5)


def _os_cause(e: BaseException) -> OSError | None:
    """The OSError behind a wrapped failure (torch.save and DCP wrap ENOSPC in RuntimeErrors)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return x
        todo += [x.__cause__, x.__context__]
        # DCP's CheckpointException keeps per-rank (exception, traceback) pairs.
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(x, "failures", {}).values()]
    return None


def _write_error(opts: Options, e: BaseException) -> ConversionError:
    cause = _os_cause(e)
    why = cause.strerror if cause else f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ConversionError(f"--save {opts.save}: write failed ({why})")


def _publish(opts: Options, staging: str) -> None:
    """Rank 0 only: swap the finished staging folder into place. An existing --save (allowed only with
    --overwrite) is moved aside first and deleted last, so a crash never leaves neither."""
    old = None
    if os.path.exists(opts.save):
        old = staging.replace("-staging", "-replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(opts.save, old)
    os.rename(staging, opts.save)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(os.path.dirname(os.path.abspath(opts.save)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(opts: Options) -> dict:
    """Run this rank's part of the job; returns the job report (complete on rank 0)."""
    device = collectives.init(opts.device, opts.timeout_s)
    me = collectives.rank()
    report = RankReport(me)
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report.phases[name] = report.phases.get(name, 0.0) + (now - clock)
        clock = now

    err: BaseException | None = None
    plan = view = cfg = family = index = identity = None
    try:
        _check_destination(opts)
        plan, cfg, family, index = _plan(opts)
        view = plan.rank_view(me)
        identity = _job_identity(opts, index)
    except ConversionError as e:
        err = e
    collectives.agree(err, device)
    phase("plan")
    report.bytes_planned = view.bytes_read
    if opts.dry_run:
        return _finish(report, plan, opts, dry_run=True)

    staging = staging_path(opts.save)
    key = manifest.job_key(identity)
    err, done = None, {}
    try:
        if me == 0:
            if os.path.exists(staging) and not opts.resume:
                shutil.rmtree(staging)  # left by a killed run; never the user's --save
            os.makedirs(os.path.join(staging, ITERATION_DIR), exist_ok=True)
            done = manifest.completed(staging, key) if opts.resume else {}
    except OSError as e:
        err = ConversionError(f"--save {opts.save}: cannot create staging folder {staging} ({e.strerror})")
    collectives.agree(err, device)
    done = collectives.broadcast_object(done)
    if done:
        # Resume: only the files not already complete are planned, read and written again.
        if opts.layout.ckpt_format == "torch":
            plan = make_plan(family, index, cfg, opts.layout, collectives.world(), bucket_bytes=opts.bucket_bytes,
                             skip_paths=frozenset(done))
            view = plan.rank_view(me)
        elif not all(f in done for f in _dcp_files(collectives.world())):
            done = {}  # DCP writes its files in one collective: redo them together
    try:
        _convert(opts, plan, view, cfg, family, index, staging, report, phase, device, key, done, identity)
    except ConversionError:
        if me == 0:
            shutil.rmtree(staging, ignore_errors=True)  # bad input or a full disk: nothing to resume
        raise
    except Exception as e:
        # A peer died or a collective broke: keep the finished files for --resume.
        raise ConversionError(f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                              f"(finished files kept in {staging}; rerun with --resume)") from e
    return _finish(report, plan, opts, dry_run=False)


def _convert(opts, plan: Plan, view: RankPlan, cfg, family, index, staging, report, phase, device, key, done,
             identity) -> None:
    me = view.rank
    source_dtype = {n: s.dtype for n, s in index.items()}
    targets = {t.index: t for t in view.targets}
    tensors = _allocate(view.targets)
    reader = RangeReader()
    bar = _progress_bar(opts, plan) if me == 0 else None
    phase("allocate")
    try:
        for b, reads in enumerate(view.reads):
            err, data = None, {}
            try:
                faults.maybe_fail(me, "read")
                for item in reads:
                    data[item.index] = reader.read(item)
            except Exception as e:  # noqa: BLE001 - any failure is agreed on, so no peer waits in the exchange
                err = e
            phase("read")
            total_done = collectives.agree(err, device, progress=reader.bytes_read)
            if bar is not None:
                bar.update(total_done - bar.n)
            sends = {d: _pack(data, ts, plan.items, source_dtype) for d, ts in view.sends[b].items()}
            recv_bytes = {s: sum(t.nbytes for t in ts) for s, ts in view.recvs[b].items()}
            faults.maybe_fail(me, "exchange")
            got = collectives.exchange(sends, recv_bytes, device)
            for s, ts in view.recvs[b].items():
                _unpack(got[s], ts, tensors, targets, source_dtype, plan.items)
            phase("exchange")
    finally:
        reader.close()
        if bar is not None:
            bar.close()
    report.bytes_read = reader.bytes_read
    report.bytes_sent = view.bytes_sent
    report.bytes_received = view.bytes_received

    qkv_bias = any(t.key.endswith("linear_qkv.bias") for t in plan.targets)
    qk_norm = any("q_layernorm" in t.key for t in plan.targets)
    args = megatron_args(cfg, opts.layout, plan.padded_vocab, family.name, cfg.dtype, qk_norm, qkv_bias)
    folder = os.path.join(staging, ITERATION_DIR)
    err, records = None, []
    try:
        if opts.layout.ckpt_format == "torch":
            for unit in view.units:
                containers: dict[str, dict[str, torch.Tensor]] = {}
                for t in view.targets:
                    if t.unit == unit.index:
                        containers.setdefault(t.container, {})[t.key] = tensors.pop(t.index)
                report.bytes_written += legacy.write_file(os.path.join(staging, unit.path), containers, args)
                records.append(manifest.record_done(staging, unit.path, key))
                faults.maybe_fail(me, "write")
    except Exception as e:  # noqa: BLE001 - every write failure is agreed on and reported by its cause
        err = _write_error(opts, e)
    if opts.layout.ckpt_format != "torch" and not done:
        try:
            torch_dist.save(folder, plan, me, tensors, torch_dist.common_state(args), save_id=key)
            mine = [f for f in _dcp_files(plan.world) if os.path.basename(f).startswith(f"__{me}_")
                    or (me == 0 and not os.path.basename(f).startswith("__"))]
            for rel in mine:
                records.append(manifest.record_done(staging, rel, key))
                report.bytes_written += records[-1]["size"]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
            err = _write_error(opts, e)
    tensors.clear()
    phase("write")
    collectives.agree(err, device)
    everything = collectives.gather_objects(records)
    err = None
    if me == 0:
        try:
            files = {r["path"]: r for rank_records in everything for r in rank_records}
            files.update({p: r for p, r in done.items() if p not in files})
            legacy.write_tracker(staging, args.iteration)
            tracker = "latest_checkpointed_iteration.txt"
            files[tracker] = dict(manifest.file_digest(os.path.join(staging, tracker)), path=tracker)
            manifest.write_manifest(staging, {
                "tool": "dist_reshard", "version": __version__, "command": opts.command,
                "source": identity["source"], "source_folder": os.path.abspath(opts.load),
                "family": family.name, "layout": identity["layout"], "world_size": plan.world,
                "padded_vocab_size": plan.padded_vocab, "true_vocab_size": cfg.vocab_size,
                "files": [{k: r[k] for k in ("path", "size", "sha256")} for _, r in sorted(files.items())],
            })
            shutil.rmtree(os.path.join(staging, manifest.JOURNAL_DIR), ignore_errors=True)
            _publish(opts, staging)
        except OSError as e:
            err = ConversionError(f"--save {opts.save}: cannot publish the checkpoint ({e.strerror})")
    collectives.agree(err, device)
    phase("publish")


def _finish(report: RankReport, plan: Plan, opts: Options, dry_run: bool) -> dict:
    report.peak_rss_bytes = _peak_rss()
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
        "transfers": len(plan.transfers),
        "buckets": len(plan.buckets),
        "largest_read_item_bytes": plan.largest_item_bytes,
        "ranks": [dict(r, planned=a) for r, a in zip(reports, acc)],
    }
    total_read = sum(r["bytes_read"] for r in reports)
    job["bytes_read_total"] = total_read
    job["read_amplification"] = (total_read / plan.source_bytes) if plan.source_bytes and not dry_run else None
    return job
