"""The copies of the embedding and output head that an HF multi-token-prediction layer stores.

DeepSeek-V3 and GLM-4.5 checkpoints give each MTP layer `embed_tokens` and `shared_head.head`; their models
share the main embedding and head, and so does Megatron-Core, which stores neither copy. HF -> Megatron
therefore checks each copy equals its main tensor byte for byte (the ranks split the rows) and refuses the
job naming the copy when it does not; the way back writes the copies from the main tensors again.
"""

from __future__ import annotations

import os

from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig
from ..families.mapping import Family, instances
from ..formats.safetensors_index import SourceTensor

_READ_BYTES = 64 << 20


def shared_copies(family: Family, cfg: ModelConfig) -> list[tuple[str, str]]:
    """(HF copy, HF main tensor) of every copy the MTP layers store (`Rule.shared_with`)."""
    by_name = {r.megatron: r for r in family.rules if r.home != "mtp" and not r.mtp}
    out = []
    for rule in family.rules:
        if not rule.shared_with:
            continue
        main = by_name[rule.shared_with]
        if main.tied_to and cfg.tie_word_embeddings:
            main = by_name[main.tied_to]
        out += [(rule.hf_names(i, e, cfg)[0], main.hf[0]) for i, e in instances(rule, cfg)]
    return out


def check_shared_copies(index: dict[str, SourceTensor], pairs: list[tuple[str, str]], rank: int,
                        world: int) -> int:
    """This rank's share of the rows of each copy compared with the main tensor's; the bytes it read."""
    read = 0
    for copy, main in pairs:
        a, b = index.get(copy), index.get(main)
        if a is None:
            raise ConversionError(f"source tensor {copy!r} is missing: a multi-token-prediction layer stores its "
                                  f"copy of {main!r} there; pass --drop-mtp to convert without the MTP layers")
        if b is None or (a.dtype, a.shape) != (b.dtype, b.shape):
            raise ConversionError(f"{a.file}: tensor {copy!r} ({a.dtype} {list(a.shape)}) is the multi-token-"
                                  f"prediction layer's copy of {main!r}, which is "
                                  + (f"{b.dtype} {list(b.shape)}" if b else "missing")
                                  + "; Megatron-Core shares the main one and cannot store a different copy")
        if a.encoding or b.encoding:
            raise ConversionError(f"{a.file}: tensor {copy!r} is stored {a.encoding or b.encoding}-encoded; the "
                                  f"copies of shared tensors are compared as stored bytes only")
        row_bytes = a.nbytes // a.rows
        lo, hi = a.rows * rank // world, a.rows * (rank + 1) // world
        step = max(1, _READ_BYTES // max(1, row_bytes))
        with open(a.file, "rb", buffering=0) as fa, open(b.file, "rb", buffering=0) as fb:
            for r in range(lo, hi, step):
                n = (min(hi, r + step) - r) * row_bytes
                x = os.pread(fa.fileno(), n, a.offset + r * row_bytes)
                y = os.pread(fb.fileno(), n, b.offset + r * row_bytes)
                read += len(x) + len(y)
                if len(x) != n or len(y) != n:
                    raise ConversionError(f"{a.file}: unexpected end of file reading {copy!r} or {main!r}")
                if x != y:
                    row = r + next(k for k in range(0, n, row_bytes) if x[k:k + row_bytes] != y[k:k + row_bytes]) \
                        // row_bytes
                    raise ConversionError(f"{a.file}: tensor {copy!r} differs from {main!r} (first in row {row}): "
                                          f"Megatron-Core's multi-token-prediction layers share the main model's "
                                          f"embedding and output layer and cannot store a copy of their own")
    return read
