"""Declarative family tables and the transform kinds that turn them into slice geometry.

A family is a tuple of `Rule`s: a Megatron name, the HF name(s) it is made of, and a transform kind.
The kind alone decides which rows/columns of which HF tensor land where in a tensor-parallel shard, so
one table serves both directions: a `Piece` is a correspondence between an HF rectangle and a region of
a Megatron block, whichever side is the source.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from ..base.errors import ConversionError
from ..config.hf_config import ModelConfig

LAYER = "decoder.layers.{i}."
HF_LAYER = "model.layers.{i}."


class Kind(Enum):
    REPLICATED = "replicated"  # whole tensor on every TP rank (norms, row-parallel biases)
    COLUMN = "column"  # split on dim 0
    ROW = "row"  # split on dim 1
    VOCAB = "vocab"  # split on dim 0 after padding the vocabulary to the Megatron multiple
    # q, k, v interleaved per query group, then split on dim 0 by whole groups. q, k and v are three HF tensors,
    # or the row sections [q; k; v] of one (Phi-3's qkv_proj): a rank then reads only its groups' rows.
    QKV = "qkv"
    GLU = "glu"  # gate and up halves, each split on dim 0, concatenated per TP rank
    # Row sections (`Rule.parts`), each split on dim 0, concatenated per TP rank: sections of one tensor, or of
    # several HF tensors in order (Qwen3.5's gated DeltaNet in_proj: in_proj_qkv's q, k, v, then z, b, a whole).
    PARTS = "parts"
    # QKV with an attention output gate (`attention_output_gate`): HF's q_proj holds [q_h; gate_h] per head, Megatron
    # holds per query group [its q heads; their gates; k; v], split on dim 0 by whole groups.
    GATED_QKV = "gated_qkv"
    # A gated DeltaNet's in_proj: HF holds [q; k; v; z] per key-head group (`in_proj_qkvz`) and [b; a] per group
    # (`in_proj_ba`); Megatron the sections [q; k; v; z; beta; alpha] (`ModelConfig.linear_qkvz_parts`), each split
    # on dim 0 by whole key-head groups and concatenated per TP rank.
    GDN_IN_PROJ = "gdn_in_proj"


@dataclass(frozen=True)
class Rule:
    megatron: str  # TransformerEngine-spec name; per-layer names hold `{i}` (LAYER, or a prefixed stack's)
    hf: tuple[str, ...]  # HF tensor name(s); `{i}` is the global layer index
    kind: Kind
    local: str | None = None  # local-spec name when it differs from the TE-spec one
    dist_key: str | None = None  # torch_dist key when it differs from the TE name with the layer dropped
    tied_to: str | None = None  # with tied embeddings this tensor is a copy of that Megatron tensor
    optional: bool = False  # present only when the HF checkpoint has it (e.g. qkv bias)
    where: str = "all"  # which layers hold it: "all" or a `ModelConfig.layer_kind` ("dense", "moe"; "M", "*", "-")
    expert: bool = False  # one tensor per routed expert: `{e}` is the global (HF) / local (Megatron) index
    grouped: str | None = None  # grouped-GEMM name (`--moe-grouped-gemm`) when it differs
    local_dist_key: str | None = None  # torch_dist key of the local spec when it differs from the TE one
    ffn: str = "dense"  # which FFN width its MLP shapes use: "dense", "expert" or "shared"
    when: str | None = None  # a ModelConfig feature it needs ("q_lora"; "!q_lora" for its absence)
    shape: Callable[[ModelConfig], list] | None = None  # the HF shapes, where the kind alone cannot tell
    keep_dtype: bool = False  # --dtype never casts it (routing biases Megatron keeps in float32)
    local_kind: Kind | None = None  # the local spec's split when it differs (MLA's down projections)
    # A second layer stack (a vision encoder): the ModelConfig sub-config (`ModelConfig.stacks`) that gives
    # its layer count and attention geometry. Its layers all live on the first pipeline stage.
    stack: str | None = None
    placement: str | None = None  # pipeline stage of a tensor outside the layers: "first" or "last"
    unsqueeze: int = 0  # leading singleton axes the Megatron tensor has beyond the HF one (a [1, 1, H] token)
    parts: Callable[[ModelConfig], tuple[int, ...]] | None = None  # Kind.PARTS: the row sections' sizes
    dist_parts: tuple[str, ...] = ()  # torch_dist stores each section under its own key `<key>.<name>`
    # A tensor of multi-token-prediction layer `{i}` (HF layer num_layers + i, Megatron `mtp.layers.{i}.`), on the
    # pipeline stage Megatron places the MTP block (`TargetLayout.mtp_stage`); torch_dist keys it per layer.
    mtp: bool = False
    # The copy of that Megatron tensor's HF tensor an MTP layer stores (its embedding, its head): Megatron
    # shares the main one, so HF -> Megatron checks the copy equals it and the way back writes it again.
    shared_with: str | None = None
    mixer: str = "all"  # which layers hold it by token mixer: "all" or a `ModelConfig.mixer_kind` ("linear", "attention")
    # Added to the values on the way to Megatron (subtracted on the way back): Qwen3-Next's gated DeltaNet norm
    # scales by its weight, Megatron's zero-centred norm by 1 + weight.
    shift: float = 0.0

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    def config(self, cfg: ModelConfig) -> ModelConfig:
        """The config whose layers and attention geometry this rule follows."""
        return cfg.stack(self.stack) if self.stack else cfg

    @property
    def home(self) -> str:
        """The pipeline stage ("first" or "last") of a tensor outside the layer stacks."""
        return self.placement or ("first" if self.megatron.startswith("embedding.") else "last")

    def applies(self, cfg: ModelConfig, layer: int) -> bool:
        # Megatron builds its MTP layers with the last decoder layer's spec (get_gpt_mtp_block_spec).
        kind = cfg.layer_kind(cfg.num_layers - 1 if self.mtp else layer)
        return (self.where == "all" or kind == self.where) and (
            self.mixer == "all" or cfg.mixer_kind(layer) == self.mixer)

    def kind_for(self, transformer_impl: str) -> Kind:
        return self.local_kind if (transformer_impl == "local" and self.local_kind) else self.kind

    def name(self, transformer_impl: str, grouped_gemm: bool = False) -> str:
        if grouped_gemm and self.grouped:
            return self.grouped
        return self.local if (transformer_impl == "local" and self.local) else self.megatron

    def torch_dist_key(self, transformer_impl: str = "transformer_engine", layer: int | None = None) -> str:
        """The DCP key. Homogeneous stacks drop the layer index (layers form a leading axis); stacks mixing
        dense and MoE layers keep it as `decoder.layers.{g}.` with the global index g."""
        key = (self.local_dist_key if transformer_impl == "local" and self.local_dist_key else None) \
            or self.dist_key or (self.megatron if self.mtp else self.megatron.replace("{i}.", ""))
        if self.mtp:  # `mtp.layers.{i}.`: always keyed by layer, never stacked
            return key.replace("{i}", str(layer))
        return key if layer is None else key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)

    def blocks(self, transformer_impl: str, shapes, names, cfg: ModelConfig, tp: int, r: int,
               padded_vocab: int) -> list[Block]:
        """TP rank r's blocks of this rule's Megatron tensor (see `blocks`)."""
        return blocks(self.kind_for(transformer_impl), shapes, names, self.config(cfg), tp, r, padded_vocab,
                      self.parts(cfg) if self.parts else None)

    def dist_sections(self, key: str, full: tuple[int, ...], cfg: ModelConfig) -> list[tuple[str, int, tuple]]:
        """(torch_dist key, first row in the full tensor, global shape) of each key the tensor is stored
        under: itself, or one per section (`dist_parts`, Megatron's split factories)."""
        if not self.dist_parts:
            return [(key, 0, full)]
        out, start = [], 0
        for name, n in zip(self.dist_parts, self.parts(cfg)):
            out.append((f"{key}.{name}", start, (n,) + full[1:]))
            start += n
        return out

    def first_dist_key(self, key: str) -> str:
        """The first key the tensor is stored under in torch_dist: its own, or its first section's."""
        return f"{key}.{self.dist_parts[0]}" if self.dist_parts else key

    def hf_names(self, layer: int | None, expert: int | None = None, cfg: ModelConfig | None = None) -> tuple[str, ...]:
        """The HF tensors of Megatron layer `layer` (mapped to its HF layer through `cfg.hf_layers`)."""
        if cfg is not None and layer is not None:
            layer = cfg.num_layers + layer if self.mtp else cfg.hf_layer(layer)
        return tuple(n.format(i=layer, e=expert) for n in self.hf)


def rule(megatron: str, hf: str | tuple[str, ...], kind: Kind, **kw) -> Rule:
    """Table-row constructor: per-layer names are written relative to the layer prefixes."""
    names = (hf,) if isinstance(hf, str) else tuple(hf)
    is_layer = kw.pop("layer", True)
    hf_layer = kw.pop("hf_layer", HF_LAYER)  # the HF layer prefix, when not `model.layers.{i}.`
    if is_layer:
        megatron = LAYER + megatron
        names = tuple(hf_layer + n for n in names)
        for field in ("local", "grouped"):
            if kw.get(field):
                kw[field] = LAYER + kw[field]
        for field in ("dist_key", "local_dist_key"):
            if kw.get(field):
                kw[field] = "decoder.layers." + kw[field]
    return Rule(megatron, names, kind, **kw)


def prefixed(rules: tuple[Rule, ...], megatron: str, hf: Callable[[str], str], **changes) -> tuple[Rule, ...]:
    """A family's rules as one part of a composite model: Megatron names under `megatron` (e.g.
    `language_model.`), HF names renamed by `hf`, and `changes` (e.g. placement) applied to every row."""
    def one(r: Rule) -> Rule:
        names = {f: megatron + getattr(r, f) for f in ("megatron", "local", "dist_key", "tied_to", "grouped",
                                                        "local_dist_key") if getattr(r, f)}
        # The stage a tensor lives on is decided by its unprefixed name (`home`): keep it.
        return dataclasses.replace(r, hf=tuple(hf(n) for n in r.hf), **names,
                                   **{"placement": None if r.per_layer else r.home, **changes})
    return tuple(one(r) for r in rules)


def name_pattern(template: str) -> re.Pattern:
    """A family name template as a regex: `{i}` any layer, `{e}` any expert (captured as group 1)."""
    return re.compile(re.escape(template).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"(\d+)"))


def mtp_layer(name: str, cfg: ModelConfig) -> int | None:
    """The layer index of an HF tensor past the decoder (`model.layers.{L + k}.`): DeepSeek-V3 stores its
    multi-token-prediction layers there, and transformers' model has no module for them."""
    m = _HF_LAYER_INDEX.match(name)
    return int(m.group(1)) if m and int(m.group(1)) >= cfg.num_layers else None


_HF_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def instances(rule: Rule, cfg: ModelConfig) -> list[tuple[int | None, int | None]]:
    """(global layer, global expert) of every tensor set a rule stands for in this model."""
    if rule.when and not cfg.flag(rule.when):
        return []
    cfg = rule.config(cfg)
    count = cfg.mtp_layers if rule.mtp else cfg.num_layers
    layers = [i for i in range(count) if rule.applies(cfg, i)] if rule.per_layer else [None]
    experts = range(cfg.num_experts) if rule.expert else [None]
    return [(i, e) for i in layers for e in experts]


@dataclass(frozen=True)
class ZeroTensor:
    """An HF tensor Megatron-Core has no counterpart for, and that changes nothing while every element is zero
    (Ernie-4.5's expert selection bias beside Megatron's softmax router): a source converts only when it is all
    zeros (`zero_tensors.check` reads it and refuses anything else, naming `why`); the way back writes zeros."""

    hf: str  # HF name; `{i}` is the layer
    where: str  # which layers hold it (a `ModelConfig.layer_kind`)
    shape: Callable[[ModelConfig], tuple[int, ...]]
    dtype: str  # the safetensors dtype HF keeps it in, whatever the model's
    why: str  # why Megatron-Core cannot hold another value


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]
    fused: tuple = ()  # fused_experts.FusedExperts: HF tensors holding every expert of a layer
    zeros: tuple[ZeroTensor, ...] = ()
    # Multi-token-prediction tensors stored outside `model.layers` (a regex searched in each name, as
    # transformers' `_keys_to_ignore_on_load_unexpected` skips them): not converted, dropped by --drop-mtp.
    unconverted_mtp: str | None = None

    def check(self, cfg: ModelConfig) -> None:
        """Family-specific refusals (features the table does not express)."""

    def check_layout(self, layout, cfg: ModelConfig) -> None:
        """Family-specific refusals of a target layout."""

    def source_index(self, index: dict, cfg: ModelConfig) -> dict:
        """An HF folder's tensors under the names the table uses (older checkpoint layouts renamed)."""
        return index


@dataclass(frozen=True)
class Piece:
    """Rows [rows) x cols [cols) of tensor `source` placed at row `dst_row`, column `dst_col` of a block.

    `source` None is vocabulary padding: `rows` counts zero rows. `cols` None means every column. In the
    family geometry the source is an HF tensor; once the planner has resolved it against a Megatron
    source, it is the stored shard or chunk that holds those elements.
    """

    source: str | None
    rows: tuple[int, int]
    cols: tuple[int, int] | None
    dst_row: int
    dst_col: int = 0

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass(frozen=True)
class Block:
    """A contiguous region of the full (unsharded, padded) Megatron tensor held by one TP rank."""

    offset: tuple[int, ...]  # in the full tensor
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def _split(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ConversionError(f"{what} ({n}) is not divisible by the tensor-parallel size {parts}")
    return n // parts


def blocks(kind: Kind, shapes: list[tuple[int, ...]], names: tuple[str, ...], cfg: ModelConfig,
           tp: int, r: int, padded_vocab: int, parts: tuple[int, ...] | None = None) -> list[Block]:
    """Geometry of TP rank r's share of one Megatron tensor, from the HF shapes alone."""
    shape = shapes[0]
    full_width = shape[1:]
    if kind is Kind.REPLICATED:
        return [Block((0,) * len(shape), shape, (Piece(names[0], (0, shape[0] if shape else 1), None, 0),))]
    if kind is Kind.COLUMN:
        n = _split(shape[0], tp, f"dim 0 of {names[0]}")
        return [Block((r * n,) + (0,) * len(full_width), (n,) + full_width,
                      (Piece(names[0], (r * n, (r + 1) * n), None, 0),))]
    if kind is Kind.ROW:
        n = _split(shape[1], tp, f"dim 1 of {names[0]}")
        return [Block((0, r * n), (shape[0], n), (Piece(names[0], (0, shape[0]), (r * n, (r + 1) * n), 0),))]
    if kind is Kind.VOCAB:
        n = padded_vocab // tp
        lo, hi = r * n, (r + 1) * n
        real = max(0, min(hi, shape[0]) - lo)
        pieces = [Piece(names[0], (lo, lo + real), None, 0)] if real else []
        if real < n:
            pieces.append(Piece(None, (0, n - real), None, real))
        return [Block((lo,) + (0,) * len(full_width), (n,) + full_width, tuple(pieces))]
    if kind is Kind.GLU:
        f = shape[0]
        n = _split(f, tp, f"ffn_hidden_size of {names[0]}")
        return [Block((half * f + r * n,) + (0,) * len(full_width), (n,) + full_width,
                      (Piece(names[half], (r * n, (r + 1) * n), None, 0),)) for half in (0, 1)]
    if kind is Kind.PARTS:
        out, start, src, base = [], 0, 0, 0  # base: the first row of the current HF tensor in the whole tensor
        for n_rows in parts:
            if src + 1 < len(names) and start - base == shapes[src][0]:
                src, base = src + 1, start
            n = _split(n_rows, tp, f"a {n_rows}-row section of {names[src]}")
            lo = start - base + r * n
            out.append(Block((start + r * n,) + (0,) * len(full_width), (n,) + full_width,
                             (Piece(names[src], (lo, lo + n), None, 0),)))
            start += n_rows
        return out
    if kind is Kind.GATED_QKV:
        ng, d, qpg = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group
        groups = _split(ng, tp, "num_query_groups (key/value heads)")
        pieces, row = [], 0
        for g in range(r * groups, (r + 1) * groups):
            heads = range(g * qpg, (g + 1) * qpg)
            spans = [(names[0], h * 2 * d) for h in heads] + [(names[0], h * 2 * d + d) for h in heads] + \
                [(names[1], g * d), (names[2], g * d)]
            for src, lo in spans:
                pieces.append(Piece(src, (lo, lo + d), None, row))
                row += d
        return [Block((r * row,) + (0,) * len(full_width), (row,) + full_width, tuple(pieces))]
    if kind is Kind.GDN_IN_PROJ:
        nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        per_key = cfg.linear_num_value_heads // nk  # value heads per key head
        groups = _split(nk, tp, "linear_num_key_heads")
        qkvz = 2 * dk + 2 * per_key * dv  # rows of one key-head group in in_proj_qkvz
        # (tensor, first row within a group, rows per group, rows of a group) of q, k, v, z, beta, alpha
        sections = ((names[0], 0, dk, qkvz), (names[0], dk, dk, qkvz), (names[0], 2 * dk, per_key * dv, qkvz),
                    (names[0], 2 * dk + per_key * dv, per_key * dv, qkvz),
                    (names[1], 0, per_key, 2 * per_key), (names[1], per_key, per_key, 2 * per_key))
        out, start = [], 0
        for src, base, n, stride in sections:
            pieces = tuple(Piece(src, (g * stride + base, g * stride + base + n), None, k * n)
                           for k, g in enumerate(range(r * groups, (r + 1) * groups)))
            out.append(Block((start + r * groups * n,) + (0,) * len(full_width), (groups * n,) + full_width, pieces))
            start += nk * n
        return out
    if kind is Kind.QKV:
        ng, d, qpg = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group
        groups = _split(ng, tp, "num_query_groups (key/value heads)")
        _split(cfg.num_attention_heads, tp, "num_attention_heads")
        rows_per_group = (qpg + 2) * d
        q_rows, kv_rows = cfg.num_attention_heads * d, ng * d
        # (tensor, first row) of q, k and v
        sections = tuple(zip(names, (0, 0, 0))) if len(names) == 3 else \
            ((names[0], 0), (names[0], q_rows), (names[0], q_rows + kv_rows))
        pieces, row = [], 0
        for g in range(r * groups, (r + 1) * groups):
            for (src, base), lo, n in zip(sections, (g * qpg * d, g * d, g * d), (qpg * d, d, d)):
                pieces.append(Piece(src, (base + lo, base + lo + n), None, row))
                row += n
        return [Block((r * groups * rows_per_group,) + (0,) * len(full_width), (row,) + full_width, tuple(pieces))]
    raise AssertionError(kind)


def hf_shapes(rule: Rule, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The HF tensors' shapes a rule implies for this config (for checking a source, or rebuilding one)."""
    cfg = rule.config(cfg)
    if rule.shape is not None:
        return rule.shape(cfg)
    h, d, v = cfg.hidden_size, cfg.kv_channels, cfg.vocab_size
    f = {"dense": cfg.ffn_hidden_size, "expert": cfg.moe_ffn_hidden_size,
         "shared": cfg.shared_expert_ffn_hidden_size}[rule.ffn]
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    name = rule.megatron
    if rule.kind is Kind.VOCAB:
        return [(v, h)]
    if rule.kind is Kind.QKV:
        tail = () if name.endswith(".bias") else (h,)
        return [(q,) + tail, (kv,) + tail, (kv,) + tail] if len(rule.hf) == 3 else [(q + 2 * kv,) + tail]
    if rule.kind is Kind.GLU:
        return [(f, h), (f, h)]
    if rule.kind is Kind.GATED_QKV:
        return [(2 * q, h), (kv, h), (kv, h)]
    if rule.kind is Kind.ROW:
        return [(h, q)] if "linear_proj" in name else [(h, f)]
    if "q_layernorm" in name or "k_layernorm" in name:
        return [(d,)]
    if name.endswith("router.weight"):
        return [(cfg.num_experts, h)]
    if name.endswith("gate_weight"):  # the shared expert's sigmoid gate
        return [(1, h)]
    return [(h,)]


def full_shape(kind: Kind, shapes: list[tuple[int, ...]], padded_vocab: int) -> tuple[int, ...]:
    """Shape of the whole Megatron tensor (what torch_dist stores, before the layer axis)."""
    if kind is Kind.VOCAB:
        return (padded_vocab,) + shapes[0][1:]
    if kind in (Kind.QKV, Kind.GLU, Kind.GATED_QKV, Kind.GDN_IN_PROJ, Kind.PARTS):
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    return shapes[0]
