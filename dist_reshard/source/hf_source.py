"""An HF safetensors folder as the converter sees it: its config, its family and its tensor index, with
FP8 block-quantized weights presented as the bfloat16 tensors they decode to, and tensors a family keeps only
while all zero checked to be so."""

from __future__ import annotations

import dataclasses
import os
import re

from . import zero_tensors
from .block_fp8 import dequantized_index
from ..families import family_for
from ..config.hf_config import ModelConfig, read_config
from ..families.mapping import Family, mtp_layer
from ..formats.safetensors_index import SourceTensor, index_folder
from ..base.errors import ConversionError


def open_hf_folder(folder: str, count_mtp: bool = True) -> tuple[ModelConfig, Family, dict[str, SourceTensor]]:
    """`count_mtp` False: the multi-token-prediction layers are to be dropped (`--drop-mtp`), not counted."""
    cfg = read_config(folder)
    config_path = os.path.join(folder, "config.json")
    family = family_for(cfg.architecture, config_path)
    index = family.source_index(dequantized_index(index_folder(folder), cfg, config_path), cfg)
    # Tensors Megatron-Core has no place for convert only while all zero: refused now, before any plan.
    zero_tensors.check(index, family, cfg)
    if count_mtp and any(r.mtp for r in family.rules):
        cfg = dataclasses.replace(cfg, mtp_layers=_mtp_layer_count(index, cfg, config_path))
    return cfg, family, index


def _mtp_layer_count(index: dict[str, SourceTensor], cfg: ModelConfig, config_path: str) -> int:
    """The multi-token-prediction layers the tensors hold: layers num_layers .. num_layers + n - 1, at most the
    `num_nextn_predict_layers` config.json declares (transformers' checkpoints hold none of those it declares)."""
    found = sorted({mtp_layer(n, cfg) for n in index} - {None})
    declared = cfg.raw.get("num_nextn_predict_layers", 0) or 0
    if found != list(range(cfg.num_layers, cfg.num_layers + len(found))) or len(found) > declared:
        raise ConversionError(f"{config_path}: the safetensors hold layers {found} past num_hidden_layers = "
                              f"{cfg.num_layers}, but config.json declares num_nextn_predict_layers = {declared} "
                              f"multi-token-prediction layers stored from layer {cfg.num_layers} on; pass "
                              f"--drop-mtp to convert without them")
    return len(found)



def mtp_tensors(index: dict[str, SourceTensor], cfg: ModelConfig, family: Family | None = None) -> set[str]:
    """Tensors of the multi-token-prediction layers: those stored after the decoder (see `mapping.mtp_layer`),
    and those a family stores elsewhere (`Family.unconverted_mtp`)."""
    pattern = re.compile(family.unconverted_mtp) if family is not None and family.unconverted_mtp else None
    return {name for name in index if mtp_layer(name, cfg) is not None or (pattern and pattern.search(name))}
