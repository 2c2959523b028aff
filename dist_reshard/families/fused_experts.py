"""Fused HF expert tensors read as one tensor per expert.

Some HF checkpoints (GPT-OSS) store all routed experts of a layer as one tensor with a leading expert axis, and
in the orientation of `x @ W` rather than a linear layer's `W @ x`, sometimes with gate and up columns
interleaved. Megatron keeps one linear weight per expert. The index presents each expert's slab of a fused
tensor as its own source tensor in Megatron's orientation: the slab (contiguous in the file, read whole by the
rank that needs any of it) viewed as `view`, its axes permuted by `perm`. The family table then maps these
per-expert tensors with the ordinary kinds (`Kind.PARTS` for gate + up, `Kind.ROW` for down).

On the way back the per-expert tensors are stacked in one target in Megatron's orientation, and the writer
turns each expert's slab back into the file's orientation (`stored_layout`) just before writing it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig
from ..formats.mxfp4 import BLOCKS, mxfp4_experts
from ..formats.safetensors_index import SourceTensor


@dataclass(frozen=True)
class FusedExperts:
    fused: str  # the HF tensor under the layer prefix, [experts, *stored]
    per_expert: str  # the per-expert tensor's name under the layer prefix; `{e}` is the expert
    stored: Callable[[ModelConfig], tuple[int, ...]]  # one expert's shape in the file
    view: Callable[[ModelConfig], tuple[int, ...]] | None = None  # the slab's shape for `perm` (default: stored)
    perm: tuple[int, ...] | None = None  # None: the slab as stored
    # MXFP4 form (`<fused>_blocks` + `<fused>_scales`, see mxfp4.py): one expert decodes to the per-expert
    # tensor's shape, its rows then viewed as `mxfp4_view` and permuted by `mxfp4_perm` (None: as decoded).
    mxfp4_view: Callable[[ModelConfig], tuple[int, ...]] | None = None
    mxfp4_perm: tuple[int, ...] | None = None


def _permuted_shape(spec: FusedExperts, cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(one expert's stored shape, its shape once permuted, as the slab view's permuted axes)."""
    stored = tuple(spec.stored(cfg))
    view = tuple(spec.view(cfg)) if spec.view else stored
    assert math.prod(view) == math.prod(stored), (spec, view, stored)
    return stored, tuple(view[a] for a in spec.perm) if spec.perm else stored


def split_fused_experts(index: dict[str, SourceTensor], specs: tuple[FusedExperts, ...], cfg: ModelConfig,
                        layer_prefix: str = "model.layers.{i}.") -> dict[str, SourceTensor]:
    """The index with every fused expert tensor replaced by its per-expert tensors (shapes checked first)."""
    out = dict(index)
    for i in range(cfg.num_layers):
        prefix = layer_prefix.format(i=i)
        for spec in specs:
            name = prefix + spec.fused
            stored, permuted = _permuted_shape(spec, cfg)
            if name + BLOCKS in out:
                out.update(mxfp4_experts(out, name, prefix + spec.per_expert, _per_expert_shape(stored, permuted),
                                         tuple(spec.mxfp4_view(cfg)) if spec.mxfp4_view else None, spec.mxfp4_perm,
                                         cfg.num_experts))
                continue
            t = out.pop(name, None)
            if t is None:
                continue  # a missing tensor is reported by name where the table's tensors are checked
            if t.shape != (cfg.num_experts,) + stored or t.encoding is not None:
                raise ConversionError(f"{t.file}: tensor {name!r} is {t.dtype} {list(t.shape)}; {cfg.num_experts} "
                                      f"experts need {[cfg.num_experts, *stored]}")
            shape = _per_expert_shape(stored, permuted)
            extra = dict(encoding="permuted", stored_shape=tuple(spec.view(cfg)) if spec.view else stored,
                         perm=spec.perm) if spec.perm else {}
            slab = t.nbytes // cfg.num_experts
            for e in range(cfg.num_experts):
                per = prefix + spec.per_expert.format(e=e)
                out[per] = dataclasses.replace(t, name=per, shape=shape, offset=t.offset + e * slab, nbytes=slab,
                                               **extra)
    return out


def _per_expert_shape(stored: tuple[int, ...], permuted: tuple[int, ...]) -> tuple[int, ...]:
    """As many axes as one expert has in the file: the leading permuted axes merge."""
    keep = len(stored) - 1
    return (math.prod(permuted[:len(permuted) - keep]),) + permuted[len(permuted) - keep:]


@dataclass(frozen=True)
class FusedTarget:
    """One fused HF tensor to write: the per-expert tensors stacked on dim 0 (`shape`), and how each expert's
    slab goes back to the file's orientation and the stack to the file's shape (`stored_layout`)."""
    name: str
    shape: tuple[int, ...]
    experts: tuple[str, ...]  # the per-expert tensors, expert 0 first
    stored_layout: tuple  # (experts, permuted slab shape, inverse permutation, file shape)


def fused_targets(names, specs: tuple[FusedExperts, ...], cfg: ModelConfig,
                  layer_prefix: str = "model.layers.{i}.") -> list[FusedTarget]:
    """The fused tensors the per-expert tensors among `names` make up."""
    names, out = set(names), []
    for i in range(cfg.num_layers):
        prefix = layer_prefix.format(i=i)
        for spec in specs:
            experts = tuple(prefix + spec.per_expert.format(e=e) for e in range(cfg.num_experts))
            if not all(n in names for n in experts):
                continue
            stored, permuted = _permuted_shape(spec, cfg)
            per = _per_expert_shape(stored, permuted)
            perm = spec.perm or tuple(range(len(stored)))
            inverse = tuple(perm.index(a) for a in range(len(perm)))
            layout = (cfg.num_experts, permuted, inverse, (cfg.num_experts,) + stored)
            out.append(FusedTarget(prefix + spec.fused, (cfg.num_experts * per[0],) + per[1:], experts, layout))
    return out


def to_stored_layout(tensor, layout):
    """A stacked target's tensor in the file's orientation (see `FusedTarget.stored_layout`)."""
    experts, permuted, inverse, shape = layout
    slabs = tensor.view((experts,) + permuted)
    return slabs.permute((0,) + tuple(1 + a for a in inverse)).contiguous().view(shape)
