"""Positional reads of exactly the planned byte ranges, counted.

No mmap and no whole-tensor loads: each read item is one `preadv` loop into a buffer allocated for it,
so the bytes a rank pulls from storage are the bytes its plan names, and the count proves it.
"""

from __future__ import annotations

import os

import torch

from ..base.errors import ConversionError
from ..plan.data import ReadItem


class RangeReader:
    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ConversionError(f"{path}: cannot open for reading ({e.strerror})") from None
            self._fds[path] = fd
        return fd

    def read(self, item: ReadItem) -> torch.Tensor:
        """The item's bytes (each of its ranges, one after the other) as a flat uint8 tensor."""
        buf = torch.empty(item.nbytes, dtype=torch.uint8)  # uninitialised: preadv fills every byte or we raise
        view = memoryview(buf.numpy())
        pos = 0
        for path, offset, nbytes in item.ranges:
            self._read_range(path, offset, view[pos:pos + nbytes], item.source)
            pos += nbytes
        return buf

    def _read_range(self, path: str, offset: int, view: memoryview, tensor: str) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise ConversionError(f"{path}: read error in tensor {tensor!r} ({e.strerror})") from None
            if n == 0:
                raise ConversionError(f"{path}: unexpected end of file at byte {offset + done} while "
                                      f"reading tensor {tensor!r} (truncated file?)")
            done += n
        self.bytes_read += done

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
