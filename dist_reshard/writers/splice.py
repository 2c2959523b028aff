"""Bytes that pass through unchanged, copied from the source file into the output file inside the kernel.

A read item whose destinations are all output tensors on the reading rank, with no decoding and no cast,
needs no user-space copy at all (`pass_through.py` says which, and where each row or row block goes): its
bytes are already laid out in the source file as the output file wants them, a contiguous range per splice.
The writer copies them file to file with `copy_file_range` (what `cp` does), and
the rest of the file streams through `write()` as usual. On the 2-vCPU VM we benchmark on, `write()` of
user memory into new page-cache pages runs at ~330 MB/s and `copy_file_range` at ~1.27 GB/s; the output
tensor's pages for such bytes are never touched, so they cost no memory either.

Writers hand their file object to the serialiser (torch.save, DCP, or the safetensors writer) wrapped in
`SplicingFile`: a write whose memory overlaps a `Splice` (an address range of an output tensor) copies
those bytes from the source instead of the (never filled) memory.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..base.errors import ConversionError


@dataclass(frozen=True)
class Splice:
    addr: int  # address of the first byte in the output tensor's memory
    nbytes: int
    path: str  # the source file holding these bytes
    offset: int  # their offset in it


_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


# Dirty pages are handed to the disk every this many bytes while a file is written, so that writeback
# overlaps the writing instead of all of it waiting in the final fsync: on the 2-vCPU VM, a 0.96 GB copy
# plus fsync took 0.88 s without and 0.53 s with (median of 5).
WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux: the final fsync does all of it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now (Linux `sync_file_range`); a hint only,
    durability still comes from fsync, so a failure here is ignored."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _address(mv: memoryview) -> int:
    return np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0]


class SplicingFile:
    """A write-only binary stream over an unbuffered file: writes go to the file (and the hasher), except
    the bytes of registered splices, which are copied from their source file. `size` counts every byte;
    `spliced` those copied in the kernel. The hasher sees only written bytes: once anything is spliced,
    `hasher` is None and the caller hashes the finished file."""

    def __init__(self, f, splices=(), hasher=None) -> None:
        self._f = f
        self._splices = sorted(splices, key=lambda s: s.addr)
        self._starts = [s.addr for s in self._splices]
        self._fds: dict[str, int] = {}
        self.hasher = hasher
        self.size = 0
        self.spliced = 0
        self._clean_to = 0  # bytes before this offset were handed to writeback

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        if not self._splices or not n:
            self._write(mv)
            return n
        addr, pos = _address(mv), 0
        i = max(0, bisect.bisect_right(self._starts, addr) - 1)
        while i < len(self._splices) and self._splices[i].addr < addr + n:
            s = self._splices[i]
            lo, hi = max(s.addr, addr), min(s.addr + s.nbytes, addr + n)
            if lo < hi:
                if lo - addr > pos:
                    self._write(mv[pos:lo - addr])
                self._copy(s, lo - s.addr, hi - lo)
                pos = hi - addr
            i += 1
        if pos < n:
            self._write(mv[pos:])
        return n

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()  # copies advance the file position too

    def fileno(self) -> int:
        return self._f.fileno()

    def close_sources(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        self.close_sources()
        self._f.close()


    def _copy_through_memory(self, fd: int, at: int, n: int) -> int:
        """Where the kernel cannot copy between these two files (another filesystem on an old kernel)."""
        data = os.pread(fd, n, at)
        done = 0
        while done < len(data):
            done += self._f.write(memoryview(data)[done:])
        return len(data)

    def _write(self, mv: memoryview) -> None:
        done = 0
        while done < mv.nbytes:
            done += self._f.write(mv[done:])
        if self.hasher is not None:
            self.hasher.update(mv)
        self.size += mv.nbytes
        self._written()

    def _copy(self, s: Splice, skip: int, n: int) -> None:
        fd = self._fds.get(s.path)
        if fd is None:
            fd = self._fds[s.path] = os.open(s.path, os.O_RDONLY)
        done = 0
        while done < n:
            at = s.offset + skip + done
            try:
                # No destination offset: the copy uses and advances the file position, like write().
                k = os.copy_file_range(fd, self._f.fileno(), n - done, at)
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE:
                    raise
                k = self._copy_through_memory(fd, at, min(n - done, 8 << 20))
            if k == 0:
                raise ConversionError(f"{s.path}: unexpected end of file at byte {at} (truncated file?)")
            done += k
        self.hasher = None
        self.size += n
        self.spliced += n
        self._written()

    def _written(self) -> None:
        end = self._f.tell()
        if end - self._clean_to >= WRITEBACK_BYTES:
            start_writeback(self._f.fileno(), self._clean_to, end - self._clean_to)
            self._clean_to = end


@contextmanager
def spliced_file(path: str, splices=(), hasher=None):
    """A new file at `path` as a `SplicingFile` (hashing with `hasher`), fsynced once the body has written
    it, after checking that every splice was copied."""
    with open(path, "wb", buffering=0) as f:
        out = SplicingFile(f, splices, hasher)
        try:
            yield out
        finally:
            out.close_sources()
        check_all_spliced(path, splices, out.spliced)
        os.fsync(f.fileno())


def check_all_spliced(where: str, splices, spliced: int) -> None:
    """Every splice's bytes were copied: a serialiser that wrote a copy of a tensor instead of the tensor
    itself would have left them out (and written the unfilled memory), so that is an error, never silent."""
    expected = sum(s.nbytes for s in splices)
    if spliced != expected:
        raise ConversionError(f"{where}: {spliced} of {expected} pass-through bytes were copied from the source; "
                              f"the serialiser did not write the output tensors in place")
