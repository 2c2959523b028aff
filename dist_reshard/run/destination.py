"""Where a job writes, and what it may never touch: the staging and replaced folders beside `--save`, the
checks on real (symlink-resolved) paths that keep every path the source resolves through out of reach,
the lock that keeps two jobs off one `--save`, and the final swap into place.

The source is never written, moved or deleted: `--save`, its staging and its replaced folder must neither
be, lie inside, nor contain `--load` or any source file's real path, with or without `--overwrite`
(an `--overwrite` job deletes the old `--save`, so a source inside it would go with it).
"""

from __future__ import annotations

import fcntl
import os
import shutil

from ..base.errors import ConversionError


def _beside(save: str, suffix: str) -> str:
    save = os.path.abspath(save)
    return os.path.join(os.path.dirname(save), f".{os.path.basename(save)}.dist_reshard-{suffix}")


def staging_path(save: str) -> str:
    return _beside(save, "staging")


def replaced_path(save: str) -> str:
    """Where an existing --save waits while the new one goes in (named from --save alone: a parent folder's
    name never matters)."""
    return _beside(save, "replaced")


def lock_path(save: str) -> str:
    return _beside(save, "lock")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_paths(save: str, load: str, source_files=()) -> None:
    """Refuse a destination that is, lies inside or contains anything the source resolves to."""
    protected = [("--load", load, os.path.realpath(load))]
    protected += [("source file", f, os.path.realpath(f)) for f in source_files]
    for what, path in (("--save", save), ("its staging folder", staging_path(save)),
                       ("its replaced folder", replaced_path(save))):
        real = os.path.realpath(path)
        for kind, given, src in protected:
            if _within(real, src) or _within(src, real):
                relation = "is" if real == src else "lies inside" if _within(real, src) else "contains"
                raise ConversionError(
                    f"--save {save}: {what} resolves to {real}, which {relation} the source ({kind} {given} -> "
                    f"{src}); the source is never written, moved or deleted, --overwrite or not")


def check_destination(save: str, overwrite: bool) -> None:
    if os.path.exists(save):
        if not os.path.isdir(save):
            raise ConversionError(f"--save {save}: exists and is not a directory")
        if os.listdir(save) and not overwrite:
            raise ConversionError(f"--save {save}: exists and is not empty; pass --overwrite to replace it")


class DestinationLock:
    """An exclusive flock on a file beside --save, held by rank 0 for the whole job. The OS drops it when
    the process dies, so a killed job never leaves the destination locked."""

    def __init__(self, save: str):
        self.save, self.path, self.fd = save, lock_path(save), None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise ConversionError(f"--save {self.save}: another dist_reshard job is writing it (lock {self.path} "
                                      f"held by {holder or 'a running job'})") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous holder unlinked while we waited to open it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still held: a waiting job then locks a fresh file
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def publish(save: str, staging: str, overwrite: bool, load: str, source_files=()) -> None:
    """Rank 0 only, under the lock: swap the finished staging folder into place. What --overwrite allows
    and where the source lies are checked again (the destination may have changed while the job ran). An
    existing --save is moved aside first and deleted last, so a crash never leaves neither."""
    check_destination(save, overwrite)
    check_paths(save, load, source_files)
    old = None
    if os.path.exists(save):
        old = replaced_path(save)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(save, old)
    os.rename(staging, save)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(os.path.dirname(os.path.abspath(save)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def launcher_gone(parent: int) -> str | None:
    """Under torchrun, why this rank must not publish: its agent (the parent it started under) is gone, so
    the job was stopped and nobody waits for this output."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.getppid() != parent:
        return f"the torchrun agent (pid {parent}) that started this rank is gone; not publishing"
    return None
