"""Any checkpoint as logical tensors under HF names: an HF folder, a legacy Megatron checkpoint of any
TP/PP/VPP/EP, or a torch_dist checkpoint.

One logical tensor at a time, reading only what it needs: its byte range in a safetensors file (FP8
weights decoded), or the rank-file shards or DCP chunks that `megatron_source` says cover it, read by
their byte ranges like any conversion source.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from ..base.errors import ConversionError
from ..read.decode import read_rows
from ..source.hf_source import open_hf_folder
from ..plan.data import IGNORED_SUFFIXES
from ..plan.targets import shifted
from ..read.reader import RangeReader
from ..formats.safe_pickle import load_tensor_blob
from ..base.dtypes import TORCH_DTYPES



def read_dcp_chunk(folder: str, info) -> torch.Tensor:
    """One stored DCP chunk, from its byte range alone (DCP stores each chunk as a torch.save blob)."""
    with open(os.path.join(folder, info.relative_path), "rb") as f:
        f.seek(info.offset)
        return load_tensor_blob(f.read(info.length), f"{f.name}: chunk at {info.offset}")


class HFCheckpoint:
    format = "hf"

    def __init__(self, path: str):
        self.path = path
        self.config, family, self.index = open_hf_folder(path)
        self.family = family.name
        self.layout: dict = {}
        self._reader = RangeReader()

    def names(self) -> list[str]:
        return sorted(self.index)

    def stored(self) -> list[tuple[str, str, tuple, int]]:
        return [(t.name, t.dtype, t.shape, t.nbytes) for t in self.index.values()]

    def files(self) -> list[tuple[str, int]]:
        return sorted((os.path.basename(f), os.path.getsize(f)) for f in {t.file for t in self.index.values()})

    def tensor(self, name: str) -> torch.Tensor:
        t = self.index.get(name)
        if t is None:
            raise ConversionError(f"{self.path}: no tensor {name!r}")
        return read_rows(self._reader, t, (0, t.rows), self.index).view(TORCH_DTYPES[t.dtype]).view(t.shape)


class MegatronCheckpoint:
    """A legacy or torch_dist checkpoint through `megatron_source`: each HF tensor is assembled from the
    stored shards or chunks that cover it, reading only those (the converter's own inverse mapping)."""

    def __init__(self, path: str):
        from ..source.megatron_source import open_source

        self.path = path
        self.source = open_source(path)
        self._shifts = shifted(self.source.family, self.source.config)
        self.format = self.source.format
        self.config = self.source.config
        self.family = self.source.family.name
        lay = self.source.layout
        self.layout = {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp}
        if lay.uneven:
            self.layout["pipeline_split"] = lay.pipeline_flags
        if self.config.num_experts:
            self.layout.update(ep=lay.ep, etp=lay.expert_tp)
        self._reader = RangeReader()
        self._blob: tuple[str, torch.Tensor] | None = None  # the last torch_dist chunk (QKV covers share one)

    def names(self) -> list[str]:
        return sorted(self.source.logical)

    def _rows(self, stored: str, rows: tuple[int, int]) -> torch.Tensor:
        st = self.source.stored[stored]
        dtype = TORCH_DTYPES[st.dtype]
        if not st.read_whole:
            return read_rows(self._reader, st, rows, self.source.stored).view(dtype).view(rows[1] - rows[0], -1)
        if self._blob is None or self._blob[0] != stored:
            self._blob = (stored, read_rows(self._reader, st, (0, st.rows), self.source.stored).view(dtype))
        return self._blob[1].view(st.rows, -1)[rows[0]:rows[1]]

    def tensor(self, name: str) -> torch.Tensor:
        t = self.source.logical.get(name)
        if t is None:
            raise ConversionError(f"{self.path}: no tensor {name!r} (names are the HF ones)")
        # A tensor no shard stores (zero_tensors.py) is all zeros.
        out = (torch.empty if name in self.source.covers else torch.zeros)(t.shape, dtype=TORCH_DTYPES[t.dtype])
        rows_view = out.view(t.rows, -1)
        for c in self.source.covers.get(name, ()):
            n = c.rows[1] - c.rows[0]
            dst = rows_view[c.rows[0]:c.rows[1]]
            if c.cols is not None:
                dst = dst[:, c.cols[0]:c.cols[1]]
            dst.copy_(self._rows(c.stored, (c.stored_row, c.stored_row + n)))
        shift = self._shifts.get(name)
        if shift:  # Megatron holds it shifted (`Rule.shift`): the HF values, as the way back writes them
            out.copy_(out.float() - shift)
        return out

    def stored(self) -> list[tuple[str, str, tuple, int]]:
        return [(t.name, t.dtype, t.shape, t.data_bytes) for t in self.source.stored.values()]

    def files(self) -> list[tuple[str, int]]:
        return sorted((os.path.relpath(f, self.path), os.path.getsize(f)) for f in self.source.files)


def open_checkpoint(path: str):
    hf = os.path.exists(os.path.join(path, "config.json")) and (
        glob.glob(os.path.join(path, "*.safetensors"))
        or os.path.exists(os.path.join(path, "model.safetensors.index.json")))
    # Anything else is opened as a Megatron checkpoint, whose reader names what is missing.
    return HFCheckpoint(path) if hf else MegatronCheckpoint(path)


def hf_names_only(names) -> list[str]:
    return [n for n in names if not n.endswith(IGNORED_SUFFIXES)]


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
