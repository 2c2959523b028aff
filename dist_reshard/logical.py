"""Any checkpoint as logical tensors under HF names: an HF folder, a legacy Megatron checkpoint of any
TP/PP/VPP, or a torch_dist checkpoint.

One logical tensor at a time, reading only what it needs: its byte range in a safetensors file, the
shard tensors of the rank files that hold it (memory-mapped, so other tensors are never touched), or the
DCP chunks that cover it. The family table says how Megatron tensors are cut and fused; the inverse
here places each Megatron block back into the HF tensors it came from.
"""

from __future__ import annotations

import glob
import io
import json
import os
from argparse import Namespace

import torch

from .errors import ConversionError
from .families import family_for
from .hf_config import ModelConfig, read_config
from .layout import TargetLayout
from .mapping import Kind, Rule, blocks, full_shape, hf_shapes
from .rank_plan import IGNORED_SUFFIXES, ReadItem
from .reader import RangeReader
from .safetensors_index import index_folder
from .dtypes import TORCH_DTYPES



def detect_format(path: str) -> str:
    if os.path.exists(os.path.join(path, "config.json")) and (
            glob.glob(os.path.join(path, "*.safetensors")) or os.path.exists(
                os.path.join(path, "model.safetensors.index.json"))):
        return "hf"
    it = _iteration_dir(path)
    if it and os.path.exists(os.path.join(it, "metadata.json")):
        return "torch_dist"
    if it and glob.glob(os.path.join(it, "mp_rank_*", "model_optim_rng.pt")):
        return "torch"
    raise ConversionError(f"{path}: neither an HF folder (config.json + *.safetensors) nor a Megatron checkpoint")


def _iteration_dir(path: str) -> str | None:
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.exists(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        return os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}")
    if os.path.exists(os.path.join(path, "metadata.json")) or glob.glob(os.path.join(path, "mp_rank_*")):
        return path
    return None


def read_dcp_chunk(folder: str, info) -> torch.Tensor:
    """One stored DCP chunk, from its byte range alone (DCP stores each chunk as a torch.save blob)."""
    with open(os.path.join(folder, info.relative_path), "rb") as f:
        f.seek(info.offset)
        return torch.load(io.BytesIO(f.read(info.length)), weights_only=True)


class HFCheckpoint:
    format = "hf"

    def __init__(self, path: str):
        self.path = path
        self.config = read_config(path)
        self.family = family_for(self.config.architecture).name
        self.index = index_folder(path)
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
        raw = self._reader.read(ReadItem(-1, t.name, t.file, (0, t.rows), t.offset, t.nbytes, 0))
        return raw.view(TORCH_DTYPES[t.dtype]).view(t.shape)


def _config_from_args(args: Namespace) -> ModelConfig:
    arch = getattr(args, "hf_architecture", None)
    if not arch:  # a checkpoint from another tool: the features decide the closest dense family
        arch = ("Qwen3ForCausalLM" if getattr(args, "qk_layernorm", False) else
                "Qwen2ForCausalLM" if getattr(args, "add_qkv_bias", False) else "LlamaForCausalLM")
    heads = args.num_attention_heads
    return ModelConfig(
        architecture=arch, model_type=getattr(args, "hf_model_type", ""), num_layers=args.num_layers,
        hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=heads,
        num_query_groups=getattr(args, "num_query_groups", None) or heads,
        kv_channels=getattr(args, "kv_channels", None) or args.hidden_size // heads,
        vocab_size=getattr(args, "true_vocab_size", None) or args.padded_vocab_size,
        max_position_embeddings=getattr(args, "max_position_embeddings", 4096),
        norm_epsilon=getattr(args, "norm_epsilon", 1e-6), rope_theta=getattr(args, "rotary_base", 10000.0),
        rope_scaling=getattr(args, "hf_rope_scaling", None),
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", True),
        attention_bias=getattr(args, "add_qkv_bias", False), dtype=None, sliding_window=None, raw={})


class MegatronCheckpoint:
    """Shared inverse mapping; subclasses say how to fetch one full (unsharded) Megatron tensor."""

    def __init__(self, path: str, args: Namespace):
        self.path = path
        self.args = args
        self.config = _config_from_args(args)
        self.family_def = family_for(self.config.architecture)
        self.family = self.family_def.name
        self.tp = args.tensor_model_parallel_size
        self.layout = {"tp": self.tp, "pp": args.pipeline_model_parallel_size,
                       "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None)}
        self.padded_vocab = args.padded_vocab_size
        self._where: dict[str, tuple[Rule, int | None, int]] = {}
        for rule in self.family_def.rules:
            if rule.tied_to and self.config.tie_word_embeddings:
                continue
            if rule.optional and not self._has(rule):
                continue
            layers = range(self.config.num_layers) if rule.per_layer else [None]
            for layer in layers:
                for pos, name in enumerate(rule.hf):
                    self._where[name.format(i=layer)] = (rule, layer, pos)

    def names(self) -> list[str]:
        return sorted(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.path}: no tensor {name!r} (names are the HF ones)")
        rule, layer, _ = self._where[name]
        full = self._full(rule, layer)
        names = tuple(n.format(i=layer) for n in rule.hf)
        shapes = hf_shapes(rule, self.config)
        out = torch.empty(shapes[names.index(name)], dtype=full.dtype)
        for b in blocks(rule.kind, shapes, names, self.config, 1, 0, self.padded_vocab):
            for p in b.pieces:
                if p.source != name:
                    continue
                src = full[b.offset[0] + p.dst_row: b.offset[0] + p.dst_row + p.nrows]
                dst = out[p.rows[0]:p.rows[1]]
                if p.cols is not None:
                    dst = dst[:, p.cols[0]:p.cols[1]]
                dst.copy_(src)
        return out

    def _assemble(self, rule: Rule, layer: int | None, shard_of) -> torch.Tensor:
        """Place each TP rank's blocks at their global offsets (legacy shards are blocks stacked on dim 0)."""
        names = tuple(n.format(i=layer) for n in rule.hf)
        shapes = hf_shapes(rule, self.config)
        full = None
        ranks = [0] if rule.kind is Kind.REPLICATED else range(self.tp)
        for r in ranks:
            shard = shard_of(r)
            if full is None:
                full = torch.empty(full_shape(rule.kind, shapes, self.padded_vocab), dtype=shard.dtype)
            row = 0
            for b in blocks(rule.kind, shapes, names, self.config, self.tp, r, self.padded_vocab):
                region = full[b.offset[0]:b.offset[0] + b.shape[0]]
                if len(b.offset) > 1:
                    region = region[:, b.offset[1]:b.offset[1] + b.shape[1]]
                region.copy_(shard[row:row + b.shape[0]])
                row += b.shape[0]
        return full


class LegacyCheckpoint(MegatronCheckpoint):
    format = "torch"

    def __init__(self, path: str):
        self.folder = _iteration_dir(path)
        self.rank_files = sorted(glob.glob(os.path.join(self.folder, "mp_rank_*", "model_optim_rng.pt")))
        self._open: dict[str, dict] = {}
        first = self._load(self.rank_files[0])
        super().__init__(path, first["args"])
        self.placement = TargetLayout(tp=self.tp, pp=self.layout["pp"], vpp=self.layout["vpp"]).layer_placement(
            self.config.num_layers)
        self.impl = "local" if any(k.endswith("input_layernorm.weight") for k in
                                   first[self._container(0)]) else "transformer_engine"

    def _load(self, path: str) -> dict:
        if path not in self._open:
            if len(self._open) > 8:
                self._open.clear()
            try:
                self._open[path] = torch.load(path, mmap=True, weights_only=False, map_location="cpu")
            except FileNotFoundError:
                raise ConversionError(f"{path}: rank file missing") from None
        return self._open[path]

    def _container(self, chunk: int) -> str:
        return f"model{chunk}" if self.layout["vpp"] else "model"

    def _file(self, tp_rank: int, pp_rank: int) -> str:
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.layout["pp"] > 1 else "")
        return os.path.join(self.folder, name, "model_optim_rng.pt")

    def _has(self, rule: Rule) -> bool:
        first = self._load(self.rank_files[0])
        key = rule.name("transformer_engine").format(i=0)
        return any(key in v or rule.name("local").format(i=0) in v for k, v in first.items()
                   if k.startswith("model") and isinstance(v, dict))

    def _full(self, rule: Rule, layer: int | None) -> torch.Tensor:
        if layer is None:
            first = rule.megatron.startswith("embedding.")
            p, v, key = (0, 0, rule.megatron) if first else (self.layout["pp"] - 1, (self.layout["vpp"] or 1) - 1,
                                                              rule.megatron)
        else:
            p, v, j = self.placement[layer]
            key = rule.name(self.impl).format(i=j)

        def shard_of(r: int) -> torch.Tensor:
            sd = self._load(self._file(r, p))[self._container(v)]
            if key not in sd:
                raise ConversionError(f"{self._file(r, p)}: tensor {key!r} missing")
            return sd[key]
        return self._assemble(rule, layer, shard_of)

    def stored(self) -> list[tuple[str, str, tuple, int]]:
        out = []
        for f in self.rank_files:
            for cname, sd in self._load(f).items():
                if cname.startswith("model") and isinstance(sd, dict):
                    for k, t in sd.items():
                        if isinstance(t, torch.Tensor):
                            out.append((f"{os.path.basename(os.path.dirname(f))}/{cname}/{k}",
                                        str(t.dtype).replace("torch.", ""), tuple(t.shape),
                                        t.numel() * t.element_size()))
        return out

    def files(self) -> list[tuple[str, int]]:
        return [(os.path.relpath(f, self.path), os.path.getsize(f)) for f in self.rank_files]


class TorchDistCheckpoint(MegatronCheckpoint):
    format = "torch_dist"

    def __init__(self, path: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder = _iteration_dir(path)
        self.meta = FileSystemReader(self.folder).read_metadata()
        common = torch.load(os.path.join(self.folder, "common.pt"), weights_only=False)
        self.chunks: dict[str, list] = {}
        for idx, info in self.meta.storage_data.items():
            if idx.offset is not None:
                self.chunks.setdefault(idx.fqn, []).append((tuple(idx.offset), info))
        super().__init__(path, common["args"])

    def _has(self, rule: Rule) -> bool:
        return rule.torch_dist_key() in self.meta.state_dict_metadata

    def _read_chunk(self, info) -> torch.Tensor:
        return read_dcp_chunk(self.folder, info)

    def _full(self, rule: Rule, layer: int | None) -> torch.Tensor:
        key = rule.torch_dist_key()
        md = self.meta.state_dict_metadata[key]
        shape = tuple(md.size)[1:] if layer is not None else tuple(md.size)
        full = torch.empty(shape, dtype=md.properties.dtype)
        for offset, info in self.chunks.get(key, []):
            if layer is not None and offset[0] != layer:
                continue  # another layer's chunk: never read
            chunk = self._read_chunk(info)
            if layer is not None:
                chunk, offset = chunk[0], offset[1:]
            region = full
            for dim, (o, n) in enumerate(zip(offset, chunk.shape)):
                region = region.narrow(dim, o, n)
            region.copy_(chunk)
        return full

    def stored(self) -> list[tuple[str, str, tuple, int]]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out = []
        for k, md in self.meta.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                n = torch.tensor([], dtype=md.properties.dtype).element_size()
                for s in md.size:
                    n *= s
                out.append((k, str(md.properties.dtype).replace("torch.", ""), tuple(md.size), n))
        return out

    def files(self) -> list[tuple[str, int]]:
        return sorted((os.path.relpath(os.path.join(self.folder, f), self.path),
                       os.path.getsize(os.path.join(self.folder, f))) for f in os.listdir(self.folder))


def open_checkpoint(path: str):
    fmt = detect_format(path)
    return {"hf": HFCheckpoint, "torch": LegacyCheckpoint, "torch_dist": TorchDistCheckpoint}[fmt](path)


def hf_names_only(names) -> list[str]:
    return [n for n in names if not n.endswith(IGNORED_SUFFIXES)]


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
