"""One rank's run of an HF -> Megatron-Core conversion: plan, read, exchange, write, publish.

Every phase ends in `collectives.agree`, so an error on any rank (bad input, a short read, a full
disk) ends every rank together with the same first line, and the output is published only after all
ranks have written: ranks write into a staging folder beside `--save` that rank 0 renames into place.
"""

from __future__ import annotations

import errno
import os
import queue
import resource
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import __version__, collectives, destination, faults, manifest, pass_through
from .destination import staging_path
from .errors import ConversionError
from .hf_source import mtp_tensors, open_hf_folder
from .layout import DTYPE_FLAGS, TargetLayout
from .megatron_args import PIPELINE_ARGS, megatron_args
from .rank_plan import DEFAULT_BUCKET_BYTES, Plan, RankPlan, Target, make_plan
from .reader import RangeReader
from .safetensors_index import DTYPE_SIZES
from .fused_experts import to_stored_layout
from .writers import hf, legacy, torch_dist
from .decode import decode
from .dtypes import DTYPE_NAMES, TORCH_DTYPES

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
    src: str = "hf"  # "hf" (safetensors folder) or "mcore" (a Megatron-Core checkpoint)
    hf_config: str | None = None  # --dst hf: reference HF folder for config and tokenizer files
    vocab_size: int | None = None  # --src mcore: the true (unpadded) vocabulary, when the args lack it
    drop_mtp: bool = False  # leave out multi-token-prediction layers (model.layers.{L + k}.*)
    layer_pattern: str | None = None  # --dst mcore: a GPT model laid out as a MambaModel pattern, or "gpt" back
    # A check of the exchange: every byte, a rank's own included, goes through the collective (at N=1 on one
    # GPU: NCCL and device buffers), none is copied locally or file to file. Same output, slower.
    loopback: bool = False


@dataclass
class RankReport:
    rank: int
    bytes_read: int = 0
    bytes_read_in_place: int = 0  # of bytes_read: never in a read buffer (copied file to file by the writers)
    bytes_planned: int = 0
    bytes_written: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0  # torch's allocator peak on the rank's GPU (NCCL's own buffers not counted)
    phases: dict = field(default_factory=dict)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _plan(opts: Options, skip_paths: frozenset = frozenset()) -> tuple[Plan, object, object, dict, object, int]:
    """(plan, config, family, HF-named index, Megatron source or None, source tensors dropped on request).
    With a Megatron source the index holds its logical HF tensors and the plan reads the shards or chunks
    that store them."""
    source, dropped = None, 0
    if opts.layout.ckpt_format == "hf" and opts.src != "mcore":
        raise ConversionError(f"--src {opts.src} --dst hf: the source is already HF safetensors")
    if opts.src == "mcore":
        from .megatron_source import open_source, true_vocab_known

        reference = None
        if opts.hf_config:
            from .hf_config import read_config

            reference = read_config(opts.hf_config)
        source = open_source(opts.load, opts.vocab_size, reference)
        if opts.layout.ckpt_format == "hf" and not (reference or true_vocab_known(source, opts.vocab_size)):
            raise ConversionError(f"--load {opts.load}: the checkpoint stores only the padded vocabulary "
                                  f"(args.padded_vocab_size = {source.args.padded_vocab_size}, no true_vocab_size or "
                                  f"vocab_size: trained with an HF tokenizer); pass --hf-config HF_DIR or --vocab-size "
                                  f"N so that the HF model gets exactly the tokenizer's rows")
        cfg, family, index = source.config, source.family, source.logical
    else:
        cfg, family, index = open_hf_folder(opts.load)
        mtp = mtp_tensors(index, cfg)
        if mtp and opts.drop_mtp:
            index = {n: t for n, t in index.items() if n not in mtp}
            dropped = len(mtp)
    if opts.layer_pattern:
        from .families.gpt_hybrid import relayout

        cfg, family = relayout(cfg, family, opts.layer_pattern)
    if getattr(opts.layout, "legacy_gpt", False):
        from .legacy_gpt import check_target

        check_target(family, cfg)
    plan = make_plan(family, index, cfg, opts.layout, collectives.world(), bucket_bytes=opts.bucket_bytes,
                     skip_paths=skip_paths, source=source)
    return plan, cfg, family, index, source, dropped


def _source_files(index: dict, source=None) -> list[str]:
    return source.files if source is not None else sorted({t.file for t in index.values()})


def _job_identity(opts: Options, source_files: list[str]) -> dict:
    identity = {"tool": "dist_reshard", "version": __version__, "source": manifest.source_fingerprint(source_files),
                "layout": dict(opts.layout.__dict__), "world_size": collectives.world()}
    if opts.layer_pattern:  # a GPT model laid out as a MambaModel (or back): part of what the output is
        identity["layer_pattern"] = opts.layer_pattern
    return identity


def _dcp_files(world: int) -> list[str]:
    names = [f"__{r}_0.distcp" for r in range(world)] + [".metadata", "common.pt", "metadata.json"]
    return [f"{ITERATION_DIR}/{n}" for n in names]


def _allocate(targets: list[Target]) -> dict[int, torch.Tensor]:
    out = {}
    for t in targets:
        dtype = TORCH_DTYPES[t.dtype]
        out[t.index] = torch.zeros(t.shape, dtype=dtype) if t.padded else torch.empty(t.shape, dtype=dtype)
    return out


def _block(data: dict[int, torch.Tensor], t, items, source_dtype: dict[str, str]) -> torch.Tensor:
    """A transfer's bytes in its read buffer: a (rows, row bytes) uint8 view, strided for column slices."""
    item = items[t.item]
    nrows = item.rows[1] - item.rows[0]
    buf = data[t.item]
    block = buf.view(nrows, buf.numel() // nrows)[t.rows[0] - item.rows[0]:t.rows[1] - item.rows[0]]
    if t.cols is not None:
        itemsize = DTYPE_SIZES[source_dtype[item.source]]
        block = block[:, t.cols[0] * itemsize:t.cols[1] * itemsize]
    return block


def _copy_local(data: dict[int, torch.Tensor], transfers, tensors: dict[int, torch.Tensor],
                targets: dict[int, Target], source_dtype: dict[str, str], items) -> None:
    """Transfers to this rank itself: straight from the read buffer into the target, neither packed nor
    exchanged. Same cast semantics as `_unpack`: values in the source dtype, cast by copy_ per slice.
    Items read directly into their target have no buffer here: nothing is left to copy."""
    for t in transfers:
        if t.item not in data:
            continue
        _place(_block(data, t, items, source_dtype).view(TORCH_DTYPES[source_dtype[items[t.item].source]]), t,
               tensors, targets)


def _place(values: torch.Tensor, t, tensors: dict[int, torch.Tensor], targets: dict[int, Target]) -> None:
    """One transfer's values ((rows, cols) in the source dtype) into its slice of its target; the cast to
    --dtype happens here, per slice. Shared by received (`_unpack`) and local (`_copy_local`) transfers."""
    rows = t.rows[1] - t.rows[0]
    dst = tensors[t.target].view(targets[t.target].rows, -1)
    # dst_col: a row-parallel shard placed into a whole tensor (Megatron -> HF) starts mid-row.
    dst[t.dst_row:t.dst_row + rows, t.dst_col:t.dst_col + values.shape[-1]].copy_(values)


def _pack(data: dict[int, torch.Tensor], sends: dict[int, list], items, source_dtype: dict[str, str], world: int,
          me: int, pin: bool = False) -> tuple[torch.Tensor, list[int]]:
    """One flat send buffer for `collectives.exchange_flat`: every rank's transfers but `me`'s (copied locally;
    -1 sends them too) in rank order, each in wire order, copied once from the read buffers. The copy also
    makes column slices contiguous (a view along dim 1 handed to gloo would send the underlying memory, not
    the slice)."""
    splits = [0 if d == me else sum(t.nbytes for t in sends.get(d, ())) for d in range(world)]
    buf = torch.empty(sum(splits), dtype=torch.uint8, pin_memory=pin)
    pos = 0
    for d in range(world):
        if d == me:
            continue
        for t in sends.get(d, ()):
            block = _block(data, t, items, source_dtype)
            buf[pos:pos + t.nbytes].view(block.shape).copy_(block)
            pos += t.nbytes
    return buf, splits


def _unpack(buf: torch.Tensor, transfers, tensors: dict[int, torch.Tensor], targets: dict[int, Target],
            source_dtype: dict[str, str], items) -> None:
    pos = 0
    for t in transfers:
        raw = buf[pos:pos + t.nbytes]
        pos += t.nbytes
        item = items[t.item]
        rows = t.rows[1] - t.rows[0]
        dtype = TORCH_DTYPES[source_dtype[item.source]]
        if raw.storage_offset() % dtype.itemsize:
            raw = raw.clone()  # a view as a wider dtype needs an aligned offset (mixed dtypes in one buffer)
        _place(raw.view(dtype).view(rows, -1), t, tensors, targets)


def _units_due(view: RankPlan) -> dict[int, list]:
    """Per bucket, this rank's write units whose last transfer (received or its own) lands in it: they are
    complete once that bucket is unpacked. Units no transfer fills (all padding) are due at -1."""
    unit_of = {t.index: t.unit for t in view.targets}
    last = {u.index: -1 for u in view.units}
    for b, recvs in enumerate(view.recvs):  # recvs[b][rank] holds the rank's transfers to itself
        for ts in recvs.values():
            for t in ts:
                last[unit_of[t.target]] = b
    due: dict[int, list] = {}
    for u in view.units:
        due.setdefault(last[u.index], []).append(u)
    return due


def _shift(t, tensor: torch.Tensor) -> None:
    """A whole target's values moved by its `shift` in place: computed in float32, rounded once to its dtype."""
    if t.shift:
        tensor.copy_(tensor.float() + t.shift)


def _take_containers(view: RankPlan, unit, tensors: dict[int, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A unit's tensors by legacy container, removed from `tensors` (freed once the file is written)."""
    containers: dict[str, dict[str, torch.Tensor]] = {}
    for t in view.targets:
        if t.unit == unit.index:
            tensor = tensors.pop(t.index)
            if t.stored_layout is not None:  # a fused HF expert tensor, planned as its experts stacked
                tensor = to_stored_layout(tensor, t.stored_layout)
            _shift(t, tensor)
            containers.setdefault(t.container, {})[t.key] = tensor
    return containers


def _writer_threads(units: int) -> int:
    """Background writer threads for a rank: its share of the host's CPUs (torch.save's serialisation, the
    file hash and the kernel copies run without the GIL, so files written side by side do go faster), at
    most 4, at least 1, never more than its files."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or collectives.world())
    return max(1, min(units, cpus // max(1, local), 4))


class _BackgroundWriter:
    """Writes legacy or HF files on background threads, taken in the order they are submitted, while the main
    thread goes on reading and exchanging; each file's tensors are dropped once it is written. The first
    failure is kept in `error` (later files are skipped) for the main thread to agree on; `busy_s` is
    the time spent writing, summed over the writer threads."""

    def __init__(self, write_one, threads: int = 1) -> None:
        self._write_one = write_one
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = False
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"dist_reshard-writer{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, *job) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self.error is None and not self._cancel:
                start = time.perf_counter()
                try:
                    self._write_one(*job)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread, which agrees on it
                    with self._lock:
                        self.error = self.error or e
                with self._lock:
                    self.busy_s += time.perf_counter() - start
            del job  # the unit's tensors go with it

    def join(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Wait for every submitted file (or, with cancel, only those being written)."""
        self._cancel = self._cancel or cancel
        for _ in self._threads:
            self._jobs.put(None)
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))


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


def _full_disk(folder: str) -> str | None:
    """torch.save's C++ writer reports a short write as "unexpected pos", dropping the errno; a filesystem
    left with (almost) nothing free is the reason then."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < max(1 << 20, st.f_blocks * st.f_frsize // 1000):
        return f"{os.strerror(errno.ENOSPC)}: {free} bytes left on the filesystem of {folder}"
    return None


def _write_error(opts: Options, e: BaseException) -> ConversionError:
    cause = _os_cause(e)
    why = cause.strerror if cause else _full_disk(staging_path(opts.save)) or (
        f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return ConversionError(f"--save {opts.save}: write failed ({why})")


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
    dropped = 0
    try:
        destination.check_paths(opts.save, opts.load)
        plan, cfg, family, index, source, dropped = _plan(opts)
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
        return _finish(report, plan, opts, dry_run=True, dropped=dropped, source=source)

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
            elif not all(f in done for f in _dcp_files(collectives.world())):
                done = {}  # DCP writes its files in one collective: redo them together
        try:
            _convert(opts, plan, view, cfg, family, source.stored if source else index, staging, report, phase, device,
                     key, done, identity, source_files, source=source, parent=parent)
        except ConversionError:
            if me == 0:
                shutil.rmtree(staging, ignore_errors=True)  # bad input or a full disk: nothing to resume
            raise
        except Exception as e:
            # A peer died or a collective broke: keep the finished files for --resume.
            raise ConversionError(f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                  f"(finished files kept in {staging}; rerun with --resume)") from e
        return _finish(report, plan, opts, dry_run=False, dropped=dropped, source=source)

    finally:
        if lock is not None:
            lock.release()

_HYBRID_ARGS = ("is_hybrid_model", "hybrid_override_pattern", "spec", "model_type_name")


def _output_args(opts: Options, plan: Plan, cfg, family, source):
    """Megatron args of the output; from a Megatron source, its own args carried over with the new layout."""
    qk_norm = any("q_layernorm" in t.key for t in plan.targets)
    source_dtype = cfg.dtype
    if source is not None:
        source_dtype = DTYPE_FLAGS.get(next(iter(source.logical.values())).dtype)
    args = megatron_args(cfg, opts.layout, plan.padded_vocab, family.name, source_dtype, qk_norm)
    if source is not None:
        from .megatron_source import true_vocab_known

        if not true_vocab_known(source, opts.vocab_size):  # padded rows only: still unknown, never invented
            args.vocab_size = args.true_vocab_size = None
        for k, v in vars(source.args).items():  # training flags and the stored HF config travel along
            if k in _HYBRID_ARGS and not cfg.hybrid:
                continue  # a hybrid laid out as GPTModel again (--layer-pattern gpt)
            if k in PIPELINE_ARGS:
                continue  # the new layout's split, even where it leaves a field None
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    if getattr(opts.layout, "legacy_gpt", False):
        from .legacy_gpt import ARGS

        vars(args).update(ARGS)
    return args


def _write_hf_metadata(opts: Options, plan: Plan, cfg, family, source, staging: str) -> list[str]:
    """Rank 0, HF output: the shard index (when there are several files) and config/tokenizer files."""
    from .hf_export import hf_config
    from .rank_plan import build_hf_targets, kept_dtypes

    # The whole file set, also when a resumed plan covers only the files still missing.
    pairs, paths = build_hf_targets(source.logical, cfg, opts.layout, kept_dtypes(family, cfg))
    names = []
    if paths != ["model.safetensors"]:
        hf.write_index(staging, {t.key: paths[k[0]] for k, t in pairs}, sum(t.nbytes for _, t in pairs))
        names.append("model.safetensors.index.json")
    dtype = opts.layout.dtype or DTYPE_FLAGS.get(pairs[0][1].dtype)
    names += hf.write_config(staging, hf_config(cfg, dtype, opts.hf_config), opts.hf_config)
    return names


def _convert(opts, plan: Plan, view: RankPlan, cfg, family, index, staging, report, phase, device, key, done,
             identity, source_files: list[str], source=None, parent: int = 0) -> None:
    me = view.rank
    source_dtype = {n: s.dtype for n, s in index.items()}
    targets = {t.index: t for t in view.targets}
    hf_out = opts.layout.ckpt_format == "hf"
    setup_error = None
    try:  # a rank that cannot allocate its share (or build the args) says so before any peer waits for it
        faults.maybe_fail(me, "allocate")
        tensors = _allocate(view.targets)
        direct = {} if opts.loopback else pass_through.direct_reads(view, plan.items, targets, index)
        # The writers copy direct items from the source file themselves, in the kernel (writers/splice.py).
        splices = pass_through.splices(direct, plan.items, tensors, targets)
        args = None if hf_out else _output_args(opts, plan, cfg, family, source)
    except Exception as e:  # noqa: BLE001 - agreed on right below
        setup_error = e
    collectives.agree(setup_error, device)
    passed_through = [0]  # direct items' bytes the reader thread has handed to the writers so far
    reader = RangeReader()
    bar = _progress_bar(opts, plan) if me == 0 else None

    # Legacy and HF files are written on background threads as soon as the last bucket that fills them has
    # landed, while later buckets are read and exchanged; their tensors are freed once written.
    written: list[dict] = []
    writer, due = None, {}
    if opts.layout.ckpt_format in ("torch", "hf") and view.units:
        def write_unit(unit, containers) -> None:
            digest: dict = {}  # hashed while the file streams out: not read back
            path = os.path.join(staging, unit.path)
            mine = splices.get(unit.index, ())
            if hf_out:
                digest.update(hf.write_file(path, [(k, DTYPE_NAMES[v.dtype], v) for k, v in containers[None].items()],
                                            splices=mine))
            else:
                legacy.write_file(path, containers, args, digest=digest,
                                  legacy_gpt=getattr(opts.layout, "legacy_gpt", False), splices=mine)
            written.append(manifest.record_done(staging, unit.path, key, digest=digest))
            faults.maybe_fail(me, "write")

        due = _units_due(view)
        writer = _BackgroundWriter(write_unit, _writer_threads(len(view.units)))
        for unit in due.pop(-1, ()):
            writer.submit(unit, _take_containers(view, unit, tensors))

    # Double buffering: bucket b+1 is read on a reader thread while bucket b is exchanged.
    pool = ThreadPoolExecutor(1, thread_name_prefix="dist_reshard-reader")

    def read_bucket(b: int):
        """Bucket b's reads: (buffers, error, bytes read so far, seconds taken)."""
        start, data, err = time.perf_counter(), {}, None
        try:
            faults.maybe_fail(me, "read")
            for item in view.reads[b]:
                if item.index in direct:  # copied by the writers (splices); counted as done for progress
                    passed_through[0] += item.nbytes
                else:
                    data[item.index] = decode(item, reader.read(item), index, device)
        except Exception as e:  # noqa: BLE001 - any failure is agreed on, so no peer waits in the exchange
            err = e
        return data, err, reader.bytes_read + passed_through[0], time.perf_counter() - start

    phase("allocate")
    pending: BaseException | None = None  # a failure after a bucket's exchange, agreed on at the next boundary
    try:
        ahead = pool.submit(read_bucket, 0) if view.reads else None
        for b in range(len(view.reads)):
            data, err, bytes_done, read_s = ahead.result()
            ahead = pool.submit(read_bucket, b + 1) if err is None and b + 1 < len(view.reads) else None
            # "read": the reads' own time (on the reader thread); "read_wait": this thread's stall on them.
            report.phases["read"] = report.phases.get("read", 0.0) + read_s
            phase("read_wait")
            if err is None and writer is not None and writer.error is not None:
                err = _write_error(opts, writer.error)  # a failed background write ends every rank now
            err = err or pending
            send_buf = send_splits = None
            if err is None:
                # Everything a rank does before the all-to-all can fail on that rank alone (bad bytes, a
                # cast), so it happens before the agreement: a rank never skips an exchange its peers are in.
                try:
                    # A rank's transfers to itself skip the wire: copied from the read buffer into their targets.
                    _copy_local(data, view.sends[b].get(me, ()), tensors, targets, source_dtype, plan.items)
                    faults.maybe_fail(me, "exchange")
                    if plan.world > 1:
                        send_buf, send_splits = _pack(data, view.sends[b], plan.items, source_dtype, plan.world, me,
                                                      pin=device.type == "cuda")
                except Exception as e:  # noqa: BLE001 - agreed on right below
                    err = e
            total_done = collectives.agree(err, device, progress=bytes_done)
            if bar is not None:
                bar.update(total_done - bar.n)
            if plan.world > 1:
                data = None  # the read buffers are no longer needed: only send + receive are in flight
                recv_splits = [0 if s == me else sum(t.nbytes for t in view.recvs[b].get(s, ()))
                               for s in range(plan.world)]
                got = collectives.exchange_flat(send_buf, send_splits, recv_splits, device)
                del send_buf
                try:  # a failure here is agreed on at the next bucket (or after the last one)
                    faults.maybe_fail(me, "unpack")
                    pos = 0
                    for s, size in enumerate(recv_splits):
                        if size:
                            _unpack(got[pos:pos + size], view.recvs[b][s], tensors, targets, source_dtype,
                                    plan.items)
                        pos += size
                except Exception as e:  # noqa: BLE001
                    pending = e
                del got
            data = None
            for unit in due.pop(b, ()):
                if pending is None:
                    writer.submit(unit, _take_containers(view, unit, tensors))
            phase("exchange")
    except BaseException:
        if writer is not None:
            writer.join(cancel=True, timeout=opts.timeout_s)  # never leave a write racing the cleanup
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
        if bar is not None:
            bar.close()
    report.bytes_read = reader.bytes_read
    report.bytes_read_in_place = sum(it.nbytes for b in view.reads for it in b if it.index in direct)
    report.bytes_sent = view.bytes_sent
    report.bytes_received = view.bytes_received

    collectives.agree(pending, device)  # the last bucket's unpacking, before any collective write
    folder = os.path.join(staging, ITERATION_DIR)
    err, records = None, []
    try:
        if writer is not None:
            # Every file went to the background writer when its last bucket landed: wait for the rest.
            # "write" is the writer thread's own time; "write_wait" this thread's stall on it.
            writer.join()
            phase("write_wait")
            report.phases["write"] = report.phases.get("write", 0.0) + writer.busy_s
            if writer.error is not None:
                err = _write_error(opts, writer.error)
            else:
                records += written
                report.bytes_written += sum(r["size"] for r in written)
                report.bytes_read += report.bytes_read_in_place  # every file's splices were copied (checked)
    except Exception as e:  # noqa: BLE001 - every write failure is agreed on and reported by its cause
        err = _write_error(opts, e)
    if opts.layout.ckpt_format == "torch_dist" and not done:
        try:
            everything_spliced = [sp for unit in splices.values() for sp in unit]  # one DCP file per rank
            for t in view.targets:
                if t.index in tensors:
                    _shift(t, tensors[t.index])
            torch_dist.save(folder, plan, me, tensors, torch_dist.common_state(args), save_id=key,
                            splices=everything_spliced)
            report.bytes_read += report.bytes_read_in_place  # the copies read the source in the kernel
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
            extra = _write_hf_metadata(opts, plan, cfg, family, source, staging) if hf_out else [
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


def _finish(report: RankReport, plan: Plan, opts: Options, dry_run: bool, dropped: int = 0, source=None) -> dict:
    report.peak_rss_bytes = _peak_rss()
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
        "dropped_mtp_tensors": dropped,
        # A Megatron source's training state, left out by name: {name: [entries, bytes]}.
        "skipped_non_model_state": dict(source.skipped) if source is not None else {},
        "ranks": [dict(r, planned=a) for r, a in zip(reports, acc)],
    }
    total_read = sum(r["bytes_read"] for r in reports)
    job["bytes_read_total"] = total_read
    job["read_amplification"] = (total_read / plan.source_bytes) if plan.source_bytes and not dry_run else None
    return job
