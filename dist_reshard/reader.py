"""Positional reads of exactly the planned byte ranges, counted.

No mmap and no whole-tensor loads: each read item is one `preadv` loop into a buffer allocated for it,
so the bytes a rank pulls from storage are the bytes its plan names, and the count proves it.
"""

from __future__ import annotations

import os

import torch

from .errors import ConversionError
from .rank_plan import ReadItem


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
        """The item's bytes as a flat uint8 tensor."""
        buf = torch.empty(item.nbytes, dtype=torch.uint8)  # uninitialised: preadv fills every byte or we raise
        view = memoryview(buf.numpy())
        fd = self._fd(item.file)
        done = 0
        while done < item.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], item.offset + done)
            except OSError as e:
                raise ConversionError(f"{item.file}: read error in tensor {item.source!r} ({e.strerror})") from None
            if n == 0:
                raise ConversionError(f"{item.file}: unexpected end of file at byte {item.offset + done} while "
                                      f"reading tensor {item.source!r} (truncated file?)")
            done += n
        self.bytes_read += done
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
