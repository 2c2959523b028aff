"""Megatron legacy (`--ckpt-format torch`) files: one `model_optim_rng.pt` per (tp, pp) rank."""

from __future__ import annotations

import errno
import os
import shutil
from argparse import Namespace

import torch

from .extra_state import linear_modules

CHECKPOINT_VERSION = 3.0  # below 3.0 Megatron reorders QKV on load


def write_file(path: str, containers: dict[str, dict[str, torch.Tensor]], args: Namespace) -> int:
    """Write one rank file; returns its size. The file is fsynced before the size is reported."""
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": args.iteration}
    for name, tensors in containers.items():
        model = dict(sorted(tensors.items()))
        for module in linear_modules(list(model)):
            model[f"{module}._extra_state"] = None
        state[name] = model
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            # torch.save reports a failed write as a RuntimeError from its zip writer; give it back its cause.
            if shutil.disk_usage(os.path.dirname(path)).free < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
            raise OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0]}", path) from e
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)


def write_tracker(folder: str, iteration: int = 1) -> None:
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
