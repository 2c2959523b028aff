"""Fused HF expert tensors read as one tensor per expert.

Some HF checkpoints (GPT-OSS) store all routed experts of a layer as one tensor with a leading expert axis, and
in the orientation of `x @ W` rather than a linear layer's `W @ x`, sometimes with gate and up columns
interleaved. Megatron keeps one linear weight per expert. The index presents each expert's slab of a fused
tensor as its own source tensor in Megatron's orientation: the slab (contiguous in the file, read whole by the
rank that needs any of it) viewed as `view`, its axes permuted by `perm`. The family table then maps these
per-expert tensors with the ordinary kinds (`Kind.PARTS` for gate + up, `Kind.ROW` for down).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from .errors import ConversionError
from .hf_config import ModelConfig
from .safetensors_index import SourceTensor


@dataclass(frozen=True)
class FusedExperts:
    fused: str  # the HF tensor under the layer prefix, [experts, *stored]
    per_expert: str  # the per-expert tensor's name under the layer prefix; `{e}` is the expert
    stored: Callable[[ModelConfig], tuple[int, ...]]  # one expert's shape in the file
    view: Callable[[ModelConfig], tuple[int, ...]] | None = None  # the slab's shape for `perm` (default: stored)
    perm: tuple[int, ...] | None = None  # None: the slab as stored


def split_fused_experts(index: dict[str, SourceTensor], specs: tuple[FusedExperts, ...], cfg: ModelConfig,
                        layer_prefix: str = "model.layers.{i}.") -> dict[str, SourceTensor]:
    """The index with every fused expert tensor replaced by its per-expert tensors (shapes checked first)."""
    out = dict(index)
    for i in range(cfg.num_layers):
        prefix = layer_prefix.format(i=i)
        for spec in specs:
            name = prefix + spec.fused
            t = out.pop(name, None)
            if t is None:
                continue  # a missing tensor is reported by name where the table's tensors are checked
            stored = tuple(spec.stored(cfg))
            if t.shape != (cfg.num_experts,) + stored or t.encoding is not None:
                raise ConversionError(f"{t.file}: tensor {name!r} is {t.dtype} {list(t.shape)}; {cfg.num_experts} "
                                      f"experts need {[cfg.num_experts, *stored]}")
            view = tuple(spec.view(cfg)) if spec.view else stored
            assert math.prod(view) == math.prod(stored), (spec, view, stored)
            if spec.perm is None:
                shape, extra = stored, {}
            else:
                permuted = [view[a] for a in spec.perm]
                # As many axes as one expert has in the file: the leading permuted axes merge.
                keep = len(stored) - 1
                shape = (math.prod(permuted[:len(permuted) - keep]),) + tuple(permuted[len(permuted) - keep:])
                extra = dict(encoding="permuted", stored_shape=view, perm=spec.perm)
            slab = t.nbytes // cfg.num_experts
            for e in range(cfg.num_experts):
                per = prefix + spec.per_expert.format(e=e)
                out[per] = dataclasses.replace(t, name=per, shape=shape, offset=t.offset + e * slab, nbytes=slab,
                                               **extra)
    return out
