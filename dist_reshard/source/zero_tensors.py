"""HF tensors a family converts only while they are all zeros (`mapping.ZeroTensor`): Megatron-Core has no
place for them, so a non-zero value would change what the model computes.

Each is a few bytes per layer (Ernie-4.5's [1, experts] selection bias), read whole when the HF folder is
opened (`hf_source.open_hf_folder`, before anything is planned); the conversion itself never reads them again, and the way back writes zeros in the dtype HF keeps them in.
"""

from __future__ import annotations

import math

import torch

from ..base.dtypes import TORCH_DTYPES
from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig
from ..formats.safetensors_index import DTYPE_SIZES, SourceTensor


def names(family, cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """HF name -> (shape, dtype, why) of every zero tensor this model has."""
    return {z.hf.format(i=i): (tuple(z.shape(cfg)), z.dtype, z.why) for z in family.zeros
            for i in range(cfg.num_layers) if cfg.layer_kind(i) == z.where}


def check(index: dict[str, SourceTensor], family, cfg: ModelConfig) -> int:
    """Refuse, naming it, a zero tensor of the source with another shape or dtype or any non-zero element;
    the number checked (left out of the conversion)."""
    checked = 0
    for name, (shape, dtype, why) in names(family, cfg).items():
        t = index.get(name)
        if t is None:
            continue
        if t.shape != shape or t.dtype != dtype:
            raise ConversionError(f"{t.file}: tensor {name!r} is {t.dtype} {list(t.shape)}, expected {dtype} "
                                  f"{list(shape)}")
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            raw = f.read(t.nbytes)
        if len(raw) != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise ConversionError(f"{t.file}: tensor {name!r} is cut short ({len(raw)} of {t.nbytes} bytes)")
        data = bytearray(raw)
        # By bits, not value: a -0.0 would come back as +0.0, not the source's bytes.
        nonzero = torch.frombuffer(data, dtype=torch.uint8).view(-1, DTYPE_SIZES[dtype]).any(dim=1).sum().item()
        if nonzero:
            values = torch.frombuffer(data, dtype=TORCH_DTYPES[dtype])
            raise ConversionError(f"{t.file}: tensor {name!r} has {nonzero} non-zero elements (largest "
                                  f"{values.abs().max().item():.4g}): {why}; converted only all zero")
        checked += 1
    return checked


def logical(family, cfg: ModelConfig) -> dict[str, SourceTensor]:
    """The zero tensors as logical tensors of a Megatron source (no file: nothing stores them)."""
    return {n: SourceTensor(n, "", dtype, shape, 0, math.prod(shape) * DTYPE_SIZES[dtype])
            for n, (shape, dtype, _) in names(family, cfg).items()}
