"""A failed write named by its cause: the OSError behind torch.save's and DCP's wrappers, or a full disk."""

from __future__ import annotations

import errno
import os


from .destination import staging_path
from ..base.errors import ConversionError
from .options import Options


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


def write_error(opts: Options, e: BaseException) -> ConversionError:
    cause = _os_cause(e)
    why = cause.strerror if cause else _full_disk(staging_path(opts.save)) or (
        f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return ConversionError(f"--save {opts.save}: write failed ({why})")
