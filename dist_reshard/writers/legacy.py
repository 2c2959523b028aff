"""Megatron legacy (`--ckpt-format torch`) files: one `model_optim_rng.pt` per (tp, pp) rank."""

from __future__ import annotations

import errno
import os
import shutil
from argparse import Namespace

import torch

from ..families.legacy_gpt import to_legacy
from ..formats.manifest import FILE_HASH, new_file_hasher
from .extra_state import linear_modules
from .splice import spliced_file

CHECKPOINT_VERSION = 3.0  # Megatron's current version; below 2.0 it reorders QKV on load


def skip_zip_crc() -> None:
    """torch.save's zip writer computes a CRC-32 per record at ~250 MB/s, which made it the slowest
    stage of a conversion (4x the time of the write itself). torch.load never checks it, and each file's
    content hash in the manifest covers integrity, so it is switched off (torch >= 2.6; the records' CRC
    fields are then zero, which only `unzip -t`-style tools notice). Splicing needs it too: a CRC would be
    computed over the output tensors' memory, which holds none of the spliced bytes (writers/splice.py)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: keep its default
        return
    config.save.compute_crc32 = False


def write_file(path: str, containers: dict[str, dict[str, torch.Tensor]], args: Namespace,
               digest: dict | None = None, legacy_gpt: bool = False, splices=()) -> int:
    """Write one rank file; returns its size. The file is fsynced before the size is reported.

    With `digest` (a dict), it is filled with the file's {"size", <file hash>}, hashed as the bytes were
    written (left empty when some bytes never passed through memory, `splices`: the caller hashes the file).
    `legacy_gpt`: the containers go in under pre-Megatron-Core names, without `_extra_state` entries (a
    Megatron-LM older than them would refuse them; newer ones default them on load)."""
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": args.iteration}
    for name, tensors in containers.items():
        if legacy_gpt:
            state[name] = to_legacy(tensors, tied_head_on_last_stage=not args.untie_embeddings_and_output_weights)
            continue
        model = dict(sorted(tensors.items()))
        for module in linear_modules(list(model)):
            model[f"{module}._extra_state"] = None
        state[name] = model
    os.makedirs(os.path.dirname(path), exist_ok=True)
    skip_zip_crc()
    with spliced_file(path, splices, new_file_hasher()) as out:
        try:
            torch.save(state, out)
        except RuntimeError as e:
            # torch.save reports a failed write as a RuntimeError from its zip writer; give it back its cause.
            if shutil.disk_usage(os.path.dirname(path)).free < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
            raise OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0]}", path) from e
    size = os.path.getsize(path)
    if digest is not None and out.hasher is not None and out.size == size:
        digest.update({"size": size, FILE_HASH: out.hasher.hexdigest()})
    return size


def write_tracker(folder: str, iteration: int = 1) -> None:
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
