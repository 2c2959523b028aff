"""An HF safetensors folder as the converter sees it: its config, its family and its tensor index, with
FP8 block-quantized weights presented as the bfloat16 tensors they decode to, and tensors a family keeps only
while all zero checked to be so."""

from __future__ import annotations

import os

from . import zero_tensors
from .block_fp8 import dequantized_index
from ..families import family_for
from ..config.hf_config import ModelConfig, read_config
from ..families.mapping import Family, mtp_layer
from ..formats.safetensors_index import SourceTensor, index_folder


def open_hf_folder(folder: str) -> tuple[ModelConfig, Family, dict[str, SourceTensor]]:
    cfg = read_config(folder)
    config_path = os.path.join(folder, "config.json")
    family = family_for(cfg.architecture, config_path)
    index = family.source_index(dequantized_index(index_folder(folder), cfg, config_path), cfg)
    # Tensors Megatron-Core has no place for convert only while all zero: refused now, before any plan.
    zero_tensors.check(index, family, cfg)
    return cfg, family, index


def mtp_tensors(index: dict[str, SourceTensor], cfg: ModelConfig) -> set[str]:
    """Tensors of the multi-token-prediction layers stored after the decoder (see `mapping.mtp_layer`)."""
    return {name for name in index if mtp_layer(name, cfg) is not None}
