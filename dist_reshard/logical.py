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
from .mapping import Kind, Rule, blocks, full_shape, hf_shapes, instances
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
    experts = getattr(args, "num_experts", None) or 0
    moe = {}
    if experts:
        freq = getattr(args, "moe_layer_freq", 1)
        pattern = [bool(x) for x in freq] if isinstance(freq, list) else [i % freq == 0 for i in range(args.num_layers)]
        moe = dict(num_experts=experts, moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_topk=args.moe_router_topk,
                   shared_expert_ffn_hidden_size=getattr(args, "moe_shared_expert_intermediate_size", None) or 0,
                   norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False), moe_layers=tuple(pattern))
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
        attention_bias=getattr(args, "add_qkv_bias", False), dtype=None, sliding_window=None, raw={}, **moe)


class MegatronCheckpoint:
    """Shared inverse mapping; subclasses say how to fetch one full (unsharded) Megatron tensor."""

    def __init__(self, path: str, args: Namespace):
        self.path = path
        self.args = args
        self.config = _config_from_args(args)
        self.family_def = family_for(self.config.architecture)
        self.family = self.family_def.name
        self.tp = args.tensor_model_parallel_size
        self.ep = getattr(args, "expert_model_parallel_size", 1) or 1
        self.etp = getattr(args, "expert_tensor_parallel_size", None) or self.tp
        self.layout = {"tp": self.tp, "pp": args.pipeline_model_parallel_size,
                       "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None)}
        if self.config.num_experts:
            self.layout.update(ep=self.ep, etp=self.etp)
        self.padded_vocab = args.padded_vocab_size
        self._where: dict[str, tuple[Rule, int | None, int | None]] = {}
        for rule in self.family_def.rules:
            if rule.tied_to and self.config.tie_word_embeddings:
                continue
            if rule.optional and not self._has(rule):
                continue
            for layer, expert in instances(rule, self.config):
                for name in rule.hf_names(layer, expert):
                    self._where[name] = (rule, layer, expert)

    def names(self) -> list[str]:
        return sorted(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.path}: no tensor {name!r} (names are the HF ones)")
        rule, layer, expert = self._where[name]
        full = self._full(rule, layer, expert)
        names = rule.hf_names(layer, expert)
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

    def _assemble(self, rule: Rule, layer: int | None, expert: int | None, shard_of) -> torch.Tensor:
        """Place each TP rank's blocks at their global offsets (legacy shards are blocks stacked on dim 0)."""
        names = rule.hf_names(layer, expert)
        shapes = hf_shapes(rule, self.config)
        tp = self.etp if rule.expert else self.tp
        full = None
        for r in ([0] if rule.kind is Kind.REPLICATED else range(tp)):
            shard = shard_of(r)
            if full is None:
                full = torch.empty(full_shape(rule.kind, shapes, self.padded_vocab), dtype=shard.dtype)
            row = 0
            for b in blocks(rule.kind, shapes, names, self.config, tp, r, self.padded_vocab):
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
        self.grouped = bool(getattr(self.args, "moe_grouped_gemm", False))

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

    def _file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        layout = TargetLayout(tp=self.tp, pp=self.layout["pp"], ep=self.ep)
        return os.path.join(self.folder, layout.legacy_rank_file(tp_rank, pp_rank, ep_rank))

    def _has(self, rule: Rule) -> bool:
        first = self._load(self.rank_files[0])
        key = rule.name("transformer_engine").format(i=0)
        return any(key in v or rule.name("local").format(i=0) in v for k, v in first.items()
                   if k.startswith("model") and isinstance(v, dict))

    def _full(self, rule: Rule, layer: int | None, expert: int | None = None) -> torch.Tensor:
        ep_rank = 0
        if layer is None:
            first = rule.megatron.startswith("embedding.")
            p, v, key = (0, 0, rule.megatron) if first else (self.layout["pp"] - 1, (self.layout["vpp"] or 1) - 1,
                                                              rule.megatron)
        else:
            p, v, j = self.placement[layer]
            local = None
            if expert is not None:
                ep_rank, local = divmod(expert, self.config.num_experts // self.ep)
            key = rule.name(self.impl, self.grouped).format(i=j, e=local)

        def shard_of(r: int) -> torch.Tensor:
            path = self._file(r, p, ep_rank)  # expert-TP rank r lives in TP rank r's file (etp divides tp)
            sd = self._load(path)[self._container(v)]
            if key not in sd:
                raise ConversionError(f"{path}: tensor {key!r} missing")
            return sd[key]
        return self._assemble(rule, layer, expert, shard_of)

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

    def _key(self, rule: Rule, layer: int | None) -> tuple[str, tuple]:
        """The DCP key holding this rule's tensor, and the leading (layer, expert) axes to select on."""
        cfg = self.config
        stacked = cfg.layers_alike
        keys = [rule.torch_dist_key(impl, None if (stacked or layer is None) else layer)
                for impl in ("transformer_engine", "local")]
        key = next((k for k in keys if k in self.meta.state_dict_metadata), keys[0])
        return key, stacked

    def _has(self, rule: Rule) -> bool:
        layer = next((i for i in range(self.config.num_layers) if rule.applies(self.config, i)), 0)
        key, _ = self._key(rule, layer if rule.per_layer else None)
        return key in self.meta.state_dict_metadata

    def _read_chunk(self, info) -> torch.Tensor:
        return read_dcp_chunk(self.folder, info)

    def _full(self, rule: Rule, layer: int | None, expert: int | None = None) -> torch.Tensor:
        key, stacked = self._key(rule, layer)
        lead = tuple(x for x in ((layer if stacked else None), expert) if x is not None)
        md = self.meta.state_dict_metadata[key]
        shape = tuple(md.size)[len(lead):]
        full = torch.empty(shape, dtype=md.properties.dtype)
        for offset, info in self.chunks.get(key, []):
            if offset[:len(lead)] != lead:
                continue  # another layer's or expert's chunk: never read
            chunk = self._read_chunk(info)
            if lead:
                chunk, offset = chunk.reshape(chunk.shape[len(lead):]), offset[len(lead):]
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
