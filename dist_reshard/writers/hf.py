"""HF safetensors output: shard files, `model.safetensors.index.json`, `config.json` and friends.

A shard file is written by the one rank that holds all of its tensors: the header (names, dtypes,
shapes, offsets, in the planner's order) first, then each tensor's bytes, hashed as they are written.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..formats.manifest import FILE_HASH, new_file_hasher
from ..formats.safetensors_index import DTYPE_SIZES
from .splice import spliced_file

# Files a reference HF folder contributes with --hf-config (besides config.json).
REFERENCE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _header(entries: list[tuple[str, str, tuple]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it


def write_file(path: str, tensors: list[tuple[str, str, torch.Tensor]], splices=()) -> dict:
    """Write one safetensors file from (name, dtype, tensor), after fsync. Returns {size, <file hash>}, or
    {} when some bytes were copied from their source without passing through memory (`splices`): the
    caller then hashes the file."""
    raw = _header([(n, d, tuple(t.shape)) for n, d, t in tensors])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with spliced_file(path, splices, new_file_hasher()) as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for _, _, t in tensors:
            assert t.is_contiguous()  # a copy would lose the addresses the splices name
            out.write(memoryview(t.view(torch.uint8).numpy()).cast("B"))
    return {"size": out.size, FILE_HASH: out.hasher.hexdigest()} if out.hasher is not None else {}


def write_index(folder: str, weight_map: dict[str, str], total_size: int) -> None:
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
        f.write("\n")


def write_config(folder: str, config: dict, reference: str | None) -> list[str]:
    """config.json (the reference folder's own when given), plus the reference's generation config and
    tokenizer files; returns the names written."""
    written = ["config.json"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if reference:
        for name in REFERENCE_FILES:
            src = os.path.join(reference, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(folder, name))
                written.append(name)
    return written
