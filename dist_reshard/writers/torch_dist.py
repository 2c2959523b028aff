"""Megatron `torch_dist` checkpoints written directly with torch.distributed.checkpoint (DCP).

No Megatron model is built: every rank hands DCP the chunks it holds as a torch ShardedTensor whose
global metadata (every chunk of the tensor, on every rank) comes from the shared plan, under Megatron's
keys and global shapes. Megatron's loader reshards from there, so any chunking that tiles the tensor
loads into any TP/PP layout.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from argparse import Namespace
from collections import defaultdict
from contextlib import contextmanager

import torch

from ..plan.data import Plan, Target
from .extra_state import linear_modules
from .legacy import skip_zip_crc
from .splice import SplicingFile, check_all_spliced
from ..base.dtypes import TORCH_DTYPES as _TORCH_DTYPES


METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
            "common_backend": "torch", "common_backend_version": 1}


def _extra_state_objects(plan: Plan) -> dict[str, io.BytesIO]:
    """One serialized None per linear module, layer and expert, keyed as Megatron's ShardedObjects are:
    `shard_<offsets>_<shape>` over the leading (layer, expert) axes, or `shard_0_1` without them."""
    out = {}
    # GPTModel drops output_layer's extra state from its sharded state dict; MambaModel (whose stack ends in
    # `decoder.final_norm`) keeps it.
    mamba = any(t.key == "decoder.final_norm.weight" for t in plan.targets)
    for t in plan.targets:
        for module in linear_modules([t.key]):
            if module.endswith("output_layer") and not (mamba and module == "output_layer"):
                continue  # the output layer has no sharded extra state (but MambaModel's); layers and LLaVA's projector do
            offsets, shape = (t.global_offset[:t.lead], t.global_shape[:t.lead]) if t.lead else ((0,), (1,))
            key = f"{module}._extra_state/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"
            if key not in out:
                buf = io.BytesIO()
                torch.save([None], buf)
                out[key] = buf
    return out


def _planner_class():
    from torch.distributed.checkpoint import DefaultSavePlanner

    class PreSerializedPlanner(DefaultSavePlanner):
        """Store BytesIO objects as they are: Megatron reads each one back with a single torch.load,
        and the default planner would pickle the BytesIO wrapper around them instead."""

        def transform_object(self, write_item, object):
            return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)

    return PreSerializedPlanner


def _writer(folder: str, save_id: str, splices=()):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    class DeterministicWriter(dcp.FileSystemWriter):
        """DCP stamps a random save id into `.metadata`; the job's own key keeps reruns and resumed
        runs byte-identical."""

        def storage_meta(self):
            return StorageMeta(checkpoint_id=None, save_id=save_id)

    class SplicingFileSystem(FileSystem):
        """DCP torch.saves each chunk into the stream it gets from here: pass-through bytes are copied
        from the source file in the kernel (writers/splice.py)."""

        spliced = 0

        @contextmanager
        def create_stream(self, path, mode):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            out = SplicingFile(open(path, "wb", buffering=0), splices)
            try:
                yield out
            finally:
                out.close()
                self.spliced += out.spliced

    writer = DeterministicWriter(folder, sync_files=True)
    writer.fs = SplicingFileSystem()
    return writer


def _PreSerializedPlanner():
    return _planner_class()()


def save(folder: str, plan: Plan, rank: int, tensors: dict[int, torch.Tensor], common: dict, save_id: str,
         splices=()) -> None:
    """Collective: every rank calls it with the tensors of its own targets (by target index); `splices`
    name the bytes of those tensors to copy from the source files rather than from memory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    # Before anything is torch.saved, the extra-state blobs included: else the first save of a process would
    # carry their CRCs and later ones zeros, and a job's bytes would depend on what its process did before.
    skip_zip_crc()
    writer_of = {u.index: u.writer for u in plan.units}
    chunks: dict[str, list[Target]] = defaultdict(list)
    for t in plan.targets:
        chunks[t.key].append(t)
    state: dict = {}
    for key, targets in chunks.items():
        local = [t for t in targets if writer_of[t.unit] == rank]
        if not local:
            continue
        meta = {t.index: ShardMetadata(list(t.global_offset), list(t.shape), f"rank:{writer_of[t.unit]}/cpu")
                for t in targets}
        global_meta = ShardedTensorMetadata(
            list(meta.values()), torch.Size(targets[0].global_shape),
            TensorProperties(dtype=_TORCH_DTYPES[targets[0].dtype]))
        shards = [Shard(tensors[t.index], meta[t.index]) for t in local]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            state[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, sharded_tensor_metadata=global_meta, process_group=None)
    if rank == 0:
        state.update(_extra_state_objects(plan))
    with warnings.catch_warnings():
        # ShardedTensor is deprecated in favour of DTensor, whose even grid cannot express our chunks.
        warnings.filterwarnings("ignore", category=FutureWarning)
        writer = _writer(folder, save_id, splices)
        dcp.save(state, storage_writer=writer, planner=_PreSerializedPlanner())
    check_all_spliced(folder, splices, writer.fs.spliced)
    if rank == 0:
        torch.save(common, os.path.join(folder, "common.pt"))
        with open(os.path.join(folder, "metadata.json"), "w") as f:
            json.dump(METADATA, f)


def common_state(args: Namespace) -> dict:
    return {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration}
