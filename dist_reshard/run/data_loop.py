"""One rank's data loop: read a bucket (on a reader thread, one bucket ahead), exchange it with every peer,
place what arrives into the output tensors, and write each file as soon as its last bucket has landed (on
background writer threads); torch_dist output is saved in one collective at the end."""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..exchange import collectives
from ..base import faults
from ..formats import manifest
from ..writers import pass_through
from ..plan.data import Plan, RankPlan, Target
from ..read.reader import RangeReader
from ..formats.safetensors_index import DTYPE_SIZES
from ..families.fused_experts import to_stored_layout
from ..writers import hf, legacy, torch_dist
from ..read.decode import decode
from ..base.dtypes import DTYPE_NAMES, TORCH_DTYPES
from .options import ITERATION_DIR, Options, RankReport, dcp_files
from .failures import write_error
from .outputs import output_args


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


def move_data(opts: Options, plan: Plan, view: RankPlan, cfg, family, index, staging: str, report: RankReport, phase,
              device, key: str, done: dict, source=None) -> tuple[list[dict], BaseException | None, object]:
    """Read, exchange and write this rank's share, bucket by bucket: (the files written, as manifest records;
    this rank's write failure, not yet agreed on; the output's args). Every failure before an exchange is
    agreed on before it, so no peer waits inside a collective for a rank that has failed."""
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
        args = None if hf_out else output_args(opts, plan, cfg, family, source)
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
                err = write_error(opts, writer.error)  # a failed background write ends every rank now
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
                err = write_error(opts, writer.error)
            else:
                records += written
                report.bytes_written += sum(r["size"] for r in written)
                report.bytes_read += report.bytes_read_in_place  # every file's splices were copied (checked)
    except Exception as e:  # noqa: BLE001 - every write failure is agreed on and reported by its cause
        err = write_error(opts, e)
    if opts.layout.ckpt_format == "torch_dist" and not done:
        try:
            everything_spliced = [sp for unit in splices.values() for sp in unit]  # one DCP file per rank
            for t in view.targets:
                if t.index in tensors:
                    _shift(t, tensors[t.index])
            torch_dist.save(folder, plan, me, tensors, torch_dist.common_state(args), save_id=key,
                            splices=everything_spliced)
            report.bytes_read += report.bytes_read_in_place  # the copies read the source in the kernel
            mine = [f for f in dcp_files(plan.world) if os.path.basename(f).startswith(f"__{me}_")
                    or (me == 0 and not os.path.basename(f).startswith("__"))]
            for rel in mine:
                records.append(manifest.record_done(staging, rel, key))
                report.bytes_written += records[-1]["size"]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
            err = write_error(opts, e)
    tensors.clear()
    phase("write")
    return records, err, args
