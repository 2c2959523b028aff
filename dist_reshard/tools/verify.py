"""`python -m dist_reshard.verify OUT [--against SRC]`: prove an output is what it claims to be.

Without `--against`: every file in the manifest exists with its recorded size and content hash, and no
unlisted file hides among them. With `--against SRC`: the job is planned again from the source's
headers, and every target tensor (legacy) or stored chunk (torch_dist) is compared byte for byte with the
slices of the source it was made from, one target at a time, so memory stays bounded by the largest
target plus the source rows it needs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..base.errors import ConversionError
from ..read.decode import read_rows
from ..source.hf_source import open_hf_folder
from ..config.layout import TargetLayout
from .logical import read_dcp_chunk
from ..formats.manifest import FILE_HASH, MANIFEST, file_digest, read_manifest
from ..plan.data import Target
from ..plan.planner import make_plan
from ..read.reader import RangeReader
from ..formats.safe_pickle import load_pt, read_dcp_metadata
from ..base.dtypes import TORCH_DTYPES as _TORCH_DTYPES



def check_files(out: str) -> list[str]:
    try:
        man = read_manifest(out)
    except (OSError, ValueError) as e:
        return [f"{os.path.join(out, MANIFEST)}: unreadable manifest ({e.__class__.__name__}: {e})"]
    problems = []
    listed = set()
    for entry in man["files"]:
        path = os.path.join(out, entry["path"])
        listed.add(os.path.normpath(entry["path"]))
        if not os.path.exists(path):
            problems.append(f"{path}: missing")
            continue
        got = file_digest(path)
        if got["size"] != entry["size"]:
            problems.append(f"{path}: size {got['size']} != recorded {entry['size']}")
        elif got[FILE_HASH] != entry.get(FILE_HASH):
            problems.append(f"{path}: content hash ({FILE_HASH}) differs from the manifest")
    for root, _dirs, files in os.walk(out):
        for name in files:
            rel = os.path.normpath(os.path.relpath(os.path.join(root, name), out))
            if rel != MANIFEST and rel not in listed:
                problems.append(f"{os.path.join(out, rel)}: not listed in the manifest")
    return problems


def _expected(target: Target, index, reader: RangeReader) -> torch.Tensor:
    """The target rebuilt from the source, piece by piece, in the output dtype."""
    out = torch.zeros(target.shape, dtype=_TORCH_DTYPES[target.dtype])
    rows_view = out.view(target.rows, -1)
    for p in target.pieces:
        if p.source is None:
            continue
        src = index[p.source]
        values = read_rows(reader, src, p.rows, index).view(_TORCH_DTYPES.get(src.dtype, torch.uint8))
        values = values.view(p.nrows, -1)
        if p.cols is not None:
            values = values[:, p.cols[0]:p.cols[1]]
        rows_view[p.dst_row:p.dst_row + p.nrows].copy_(values)
    if target.shift:  # as the writers apply it: in float32 once the tensor is whole, rounded once
        out.copy_(out.float() + target.shift)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _dcp_chunks(folder: str):
    """(key, offsets) -> loader of that stored chunk, read from its byte range alone."""
    meta = read_dcp_metadata(folder)
    chunks = {}
    for index, info in meta.storage_data.items():
        chunks[(index.fqn, tuple(index.offset) if index.offset is not None else None)] = (
            lambda info=info: read_dcp_chunk(folder, info))
    return chunks


def check_hf_against(out: str, src: str, dtype: str | None) -> list[str]:
    """An HF output against the Megatron (or HF) checkpoint it was made from: every HF tensor equals the
    source's logical tensor (cast to --dtype when one was given), one tensor at a time."""
    from ..config.layout import DTYPES
    from .logical import open_checkpoint

    got, want = open_checkpoint(out), open_checkpoint(src)
    problems = [f"{out}: tensor {n} not in the output" for n in sorted(set(want.names()) - set(got.names()))]
    problems += [f"{out}: tensor {n} not in the source" for n in sorted(set(got.names()) - set(want.names()))]
    for name in sorted(set(want.names()) & set(got.names())):
        actual, expected = got.tensor(name), want.tensor(name)
        if dtype and actual.dtype != expected.dtype:
            expected = expected.to(_TORCH_DTYPES[DTYPES[dtype]])
        if not _same(actual, expected):
            problems.append(f"{out}: tensor {name} differs from the source's")
    return problems


def _stored_args(out: str, layout: TargetLayout, plan):
    """The Megatron args an output stores (its first rank file's, or common.pt's)."""
    from ..formats.safe_pickle import read_pt_metadata

    path = (os.path.join(out, plan.units[0].path) if layout.ckpt_format == "torch"
            else os.path.join(out, "iter_0000001", "common.pt"))
    state, _ = read_pt_metadata(path)
    return path, state.get("args") if isinstance(state, dict) else None


def check_args(out: str, layout: TargetLayout, plan, cfg, family, man: dict) -> list[str]:
    """The stored args are the ones the converter writes for this source and layout, field by field."""
    from types import SimpleNamespace

    from ..run.outputs import output_args

    expected = vars(output_args(SimpleNamespace(layout=layout), plan, cfg, family, None))
    path, stored = _stored_args(out, layout, plan)
    if stored is None:
        return [f"{path}: no args namespace"]
    stored = vars(stored)
    return [f"{path}: args.{k} = {stored.get(k, '(missing)')!r}, the source gives {v!r}"
            for k, v in sorted(expected.items()) if stored.get(k, ...) != v]


def check_against(out: str, src: str) -> list[str]:
    man = read_manifest(out)
    if man["layout"].get("ckpt_format") == "hf":
        return check_hf_against(out, src, man["layout"].get("dtype"))
    layout = TargetLayout(**man["layout"])
    cfg, family, index = open_hf_folder(src)
    if man.get("layer_pattern"):  # a GPT model laid out as a MambaModel (--layer-pattern)
        from ..families.gpt_hybrid import relayout

        cfg, family = relayout(cfg, family, man["layer_pattern"])
    plan = make_plan(family, index, cfg, layout, man["world_size"])
    reader = RangeReader()
    problems = check_args(out, layout, plan, cfg, family, man)
    folder = os.path.join(out, "iter_0000001")
    try:
        if layout.ckpt_format == "torch":
            files = {}
            for t in plan.targets:
                path = os.path.join(out, plan.units[t.unit].path)
                if path not in files:
                    files.clear()  # one rank file mapped at a time
                    files[path] = load_pt(path)
                    if layout.legacy_gpt:  # pre-Megatron-Core names: compared under the Megatron-Core ones
                        from ..families.legacy_gpt import model_containers, to_mcore

                        files[path] = {c: to_mcore(files[path][c], path) for c in model_containers(files[path])}
                actual = files[path].get(t.container, {}).get(t.key)
                if actual is None:
                    problems.append(f"{path}: tensor {t.container}/{t.key} missing")
                elif not _same(actual, _expected(t, index, reader)):
                    problems.append(f"{path}: tensor {t.container}/{t.key} differs from its source slices")
        else:
            chunks = _dcp_chunks(folder)
            for t in plan.targets:
                load = chunks.get((t.key, tuple(t.global_offset)))
                if load is None:
                    problems.append(f"{folder}: chunk {t.key} at {list(t.global_offset)} missing")
                elif not _same(load(), _expected(t, index, reader)):
                    problems.append(f"{folder}: chunk {t.key} at {list(t.global_offset)} differs from its source")
    finally:
        reader.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dist_reshard.verify", description=__doc__.splitlines()[0])
    p.add_argument("out", help="a dist_reshard output folder")
    p.add_argument("--against", help="the source folder it was converted from")
    ns = p.parse_args(argv)
    try:
        problems = check_files(ns.out)
        if ns.against and not problems:
            problems = check_against(ns.out, ns.against)
    except ConversionError as e:
        problems = [str(e)]
    for line in problems:
        print(f"dist_reshard.verify: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"dist_reshard.verify: {ns.out}: OK" + (f" (every tensor equals its slices of {ns.against})"
                                                  if ns.against else " (manifest checksums)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
