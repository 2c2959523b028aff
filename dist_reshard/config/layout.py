"""The target Megatron layout: parallel sizes, pipeline placement of layers, vocabulary padding."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..base.errors import ConversionError
from .hf_config import ModelConfig

CKPT_FORMATS = ("torch_dist", "torch")
TRANSFORMER_IMPLS = ("transformer_engine", "local")
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DTYPE_FLAGS = {v: k for k, v in DTYPES.items()}  # safetensors name -> --dtype value
AUTO_MIN_CHUNK_BYTES = 64 << 20  # torch_dist chunks are not cut below this by the automatic bound


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


@dataclass(frozen=True)
class TargetLayout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ckpt_format: str = "torch_dist"
    transformer_impl: str = "transformer_engine"
    make_vocab_size_divisible_by: int = 128
    dtype: str | None = None  # "bf16" | "fp16" | "fp32"; None keeps each source tensor's dtype
    ep: int = 1  # expert-parallel size
    etp: int | None = None  # expert tensor-parallel size; None follows --tp, as Megatron-Core defaults it
    moe_grouped_gemm: bool = False  # legacy names of grouped-GEMM experts (`linear_fc1.weight{i}`)
    whole_chunk_bytes: int = 64 << 20  # torch_dist: tensors up to this size are one chunk, not one per TP rank
    # torch_dist: chunks larger than this are cut along dim 0, so each rank's share of the chunks is within a
    # few percent of 1/N; None: 1/16 of an even share of the model, at least AUTO_MIN_CHUNK_BYTES.
    max_chunk_bytes: int | None = None
    legacy_gpt: bool = False  # torch files under pre-Megatron-Core GPT names (`--dst legacy`, legacy_gpt.py)
    # Uneven pipelines, in Megatron-LM's flags (TransformerConfig's num_layers_in_first/last_pipeline_stage,
    # account_for_embedding/loss_in_pipeline_split, pipeline_model_parallel_layout). At most one way is used.
    first_stage_layers: int | None = None  # --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None  # --decoder-last-pipeline-num-layers
    embedding_in_split: bool = False  # --account-for-embedding-in-pipeline-split
    loss_in_split: bool = False  # --account-for-loss-in-pipeline-split
    stage_layout: str | None = None  # --pipeline-model-parallel-layout, e.g. "Et*3|(tt|)*29,m|L"

    def __post_init__(self):
        # Megatron-LM derives the virtual pipeline size from a layout string (stages / pp, None when 1).
        if self.stage_layout is not None and self.vpp is None and self.pp >= 1:
            try:
                n = len(parse_stage_layout(self.stage_layout))
            except ConversionError:
                return  # validate() names the fault
            if n % self.pp == 0 and n // self.pp > 1:
                object.__setattr__(self, "vpp", n // self.pp)

    @property
    def uneven(self) -> bool:
        """Any pipeline split other than Megatron's default equal one."""
        return (self.first_stage_layers is not None or self.last_stage_layers is not None or self.embedding_in_split
                or self.loss_in_split or self.stage_layout is not None)

    @property
    def pipeline_flags(self) -> str:
        """The uneven-pipeline flags in use, as a user typed them (for messages and summaries)."""
        return " ".join(flag + ("" if value is True else f" {value}") for flag, value in (
            ("--decoder-first-pipeline-num-layers", self.first_stage_layers),
            ("--decoder-last-pipeline-num-layers", self.last_stage_layers),
            ("--account-for-embedding-in-pipeline-split", self.embedding_in_split or None),
            ("--account-for-loss-in-pipeline-split", self.loss_in_split or None),
            ("--pipeline-model-parallel-layout", self.stage_layout and repr(self.stage_layout)))
            if value is not None)

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    def validate(self, cfg: ModelConfig) -> None:
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--vpp", self.vpp or 1), ("--ep", self.ep),
                            ("--etp", self.expert_tp),
                            ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by)):
            if value < 1:
                raise ConversionError(f"{flag} {value}: must be a positive integer")
        if self.whole_chunk_bytes < 0:
            raise ConversionError(f"--whole-chunk-mb {self.whole_chunk_bytes >> 20}: must not be negative")
        if self.max_chunk_bytes is not None and self.max_chunk_bytes < 1:
            raise ConversionError(f"--max-chunk-mb {self.max_chunk_bytes >> 20}: must be positive")
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConversionError(f"--ckpt-format {self.ckpt_format}: choose one of {', '.join(CKPT_FORMATS)}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConversionError(f"--transformer-impl {self.transformer_impl}: choose one of "
                                  f"{', '.join(TRANSFORMER_IMPLS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConversionError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.vpp and self.pp < 2:
            raise ConversionError(f"--vpp {self.vpp} needs --pp of at least 2 (Megatron interleaves over stages)")
        checks = [("num_attention_heads", cfg.num_attention_heads),
                  ("num_query_groups (num_key_value_heads)", cfg.num_query_groups)]
        if not all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
            checks.append(("ffn_hidden_size (intermediate_size)", cfg.ffn_hidden_size))
        if cfg.hybrid:
            if self.vpp:
                raise ConversionError(f"--vpp {self.vpp}: Megatron-Core's MambaModel has no virtual pipeline stages")
            if self.transformer_impl == "local":
                raise ConversionError("--transformer-impl local: Megatron-Core's MambaModel has only a "
                                      "TransformerEngine layer spec (mamba_stack_spec)")
            checks += [("the mamba heads (mamba_num_heads / num_heads)", cfg.mamba_num_heads),
                       ("the mamba groups (n_groups: B and C are split by whole groups)", cfg.mamba_num_groups)]
        if cfg.num_experts and cfg.shared_expert_ffn_hidden_size:
            checks.append(("shared_expert_intermediate_size", cfg.shared_expert_ffn_hidden_size))
        for what, n in checks:
            if n % self.tp:
                raise ConversionError(f"--tp {self.tp}: {what} = {n} is not divisible by the tensor-parallel size")
        self._validate_experts(cfg)
        if cfg.num_attention_heads % cfg.num_query_groups:
            raise ConversionError(f"config.json: num_attention_heads {cfg.num_attention_heads} is not a multiple "
                                  f"of num_key_value_heads {cfg.num_query_groups}")
        if cfg.hybrid and (self.embedding_in_split or self.loss_in_split or self.stage_layout is not None):
            # MambaStack._select_layers_for_pipeline_parallel reads num_layers_in_first/last_pipeline_stage and
            # nothing else, while its attention layers would take the accounted stages into their offsets.
            raise ConversionError(f"{self.pipeline_flags}: not supported for Megatron-Core's MambaModel, whose "
                                  f"MambaStack splits its layers by --decoder-first/last-pipeline-num-layers only")
        if self.uneven and self.legacy_gpt:
            raise ConversionError(f"{self.pipeline_flags}: not supported here; the pre-Megatron-Core GPT model "
                                  f"(--dst legacy) splits layers evenly")
        counts = self.chunk_layers(cfg.num_layers)  # refuses what Megatron-Core refuses
        self._validate_mtp(cfg)
        holders = {(0, 0), (self.pp - 1, self.chunks - 1)} | ({self.mtp_stage()} if cfg.mtp_layers else set())
        empty = [(p, v) for p in range(self.pp) for v in range(self.chunks) if not counts[p][v]
                 and (p, v) not in holders]
        if empty and self.ckpt_format == "torch":
            raise ConversionError(f"{self.pipeline_flags}: pipeline rank {empty[0][0]}'s chunk {empty[0][1]} holds no "
                                  f"layer, which a legacy (torch) checkpoint cannot store; use --ckpt-format torch_dist")

    def chunk_layers(self, num_layers: int) -> list[list[int]]:
        """Decoder layers in each model chunk, [pipeline rank][virtual chunk], as Megatron-Core's
        get_num_layers_to_build counts them; a ConversionError naming Megatron-Core's rule for layouts it
        refuses (TransformerConfig.__post_init__, PipelineParallelLayerLayout.validate_layer_layout)."""
        pp, vpp = self.pp, self.chunks
        if self.stage_layout is not None:
            return self._layout_chunk_layers(num_layers)
        first, last = self.first_stage_layers, self.last_stage_layers
        if first is not None or last is not None:
            if pp == 1:  # Megatron-Core's arithmetic then builds the first (or last) stage's count on one stage
                raise ConversionError(f"{self.pipeline_flags}: needs --pp of at least 2 (one pipeline stage is "
                                      f"both the first and the last and holds every layer)")
            return self._first_last_chunk_layers(num_layers, first, last)
        extra = int(self.embedding_in_split) + int(self.loss_in_split)
        where = f"--pp {pp}" + (f" x --vpp {self.vpp}" if self.vpp else "")
        if extra:
            where += " " + self.pipeline_flags
            if (num_layers + extra) % pp or (num_layers + extra) // pp % vpp:
                raise ConversionError(
                    f"{where}: num_hidden_layers = {num_layers} plus the {extra} accounted stage(s) is not divisible "
                    f"into {pp * vpp} equal pipeline chunks (Megatron-Core's TransformerConfig requires "
                    f"num_layers + embedding + loss divisible by pipeline_model_parallel_size, and the result by "
                    f"virtual_pipeline_model_parallel_size)")
            per = (num_layers + extra) // (pp * vpp)
            counts = [[per] * vpp for _ in range(pp)]
            counts[0][0] -= int(self.embedding_in_split)
            counts[pp - 1][vpp - 1] -= int(self.loss_in_split)
            if min(counts[0][0], counts[pp - 1][vpp - 1]) < 0:
                raise ConversionError(f"{where}: a pipeline chunk of {per} layers cannot also hold the embedding and "
                                      f"the loss (Megatron-Core's get_num_layers_to_build: not enough layers in the "
                                      f"first/last virtual pipeline stage)")
            return counts
        if num_layers % (pp * vpp):
            raise ConversionError(f"{where}: num_hidden_layers = {num_layers} is not divisible into {pp * vpp} equal "
                                  f"pipeline chunks (uneven splits: --decoder-first/last-pipeline-num-layers, "
                                  f"--account-for-embedding/loss-in-pipeline-split or --pipeline-model-parallel-layout)")
        return [[num_layers // (pp * vpp)] * vpp for _ in range(pp)]

    def _first_last_chunk_layers(self, num_layers: int, first: int | None, last: int | None) -> list[list[int]]:
        pp, vpp = self.pp, self.chunks
        where = self.pipeline_flags + (f" --pp {pp}" + (f" --vpp {self.vpp}" if self.vpp else ""))
        rule = "Megatron-Core's TransformerConfig"
        if self.embedding_in_split or self.loss_in_split:
            raise ConversionError(f"{where}: {rule}: num_layers_in_first_pipeline_stage and "
                                  f"num_layers_in_last_pipeline_stage cannot be set with "
                                  f"account_for_embedding_in_pipeline_split or account_for_loss_in_pipeline_split")
        middle_layers, middle_stages = num_layers, pp
        for what, n in (("first", first), ("last", last)):
            if n is None:
                continue
            if n <= 0:
                raise ConversionError(f"{where}: {rule}: num_layers_in_{what}_pipeline_stage must be larger than 0")
            if n % vpp:
                raise ConversionError(f"{where}: {rule}: the {n} layers of the {what} stage must be divisible by the "
                                      f"virtual pipeline size {vpp}")
            middle_layers -= n
            middle_stages -= 1
        if middle_layers < 0:
            raise ConversionError(f"{where}: the first and last stages' layers exceed num_hidden_layers = "
                                  f"{num_layers}")
        if bool(middle_layers) != bool(middle_stages):
            raise ConversionError(f"{where}: {rule}: {middle_layers} layers are left for {max(middle_stages, 0)} "
                                  f"middle pipeline stages of num_hidden_layers = {num_layers} (both or neither "
                                  f"must be zero)")
        if middle_stages and middle_layers % middle_stages:
            raise ConversionError(f"{where}: {rule}: the {middle_layers} middle layers must be divisible by the "
                                  f"{middle_stages} middle pipeline stages")
        per = middle_layers // middle_stages if middle_stages else 0
        if middle_stages and per % vpp:
            raise ConversionError(f"{where}: {rule}: the {per} layers of each middle pipeline stage must be "
                                  f"divisible by the virtual pipeline size {vpp}")
        if self.vpp and not middle_stages and pp > 1:
            # get_transformer_layer_offset divides each virtual chunk's middle layers by the middle stage count.
            raise ConversionError(f"{where}: Megatron-Core's get_transformer_layer_offset fails (division by zero "
                                  f"middle stages) with virtual pipeline stages and no middle pipeline stage")
        counts = [per] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[pp - 1] = last
        return [[n // vpp] * vpp for n in counts]

    def _layout_chunk_layers(self, num_layers: int) -> list[list[int]]:
        pp, text = self.pp, self.stage_layout
        where = f"--pipeline-model-parallel-layout {text!r} --pp {pp}"
        others = [f for f in ("--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
                              "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split")
                  if f in self.pipeline_flags]
        if others:
            raise ConversionError(f"{where}: Megatron-Core's TransformerConfig: pipeline_model_parallel_layout "
                                  f"cannot be set with other pipeline layout arguments ({', '.join(others)})")
        stages = parse_stage_layout(text)
        if len(stages) % pp:
            raise ConversionError(f"{where}: {len(stages)} stages are not divisible by pipeline_model_parallel_size "
                                  f"(Megatron-Core's PipelineParallelLayerLayout)")
        vpp = len(stages) // pp
        if (self.vpp or 1) != vpp:
            raise ConversionError(f"{where} --vpp {self.vpp}: virtual_pipeline_model_parallel_size conflicts with "
                                  f"the {vpp} virtual stages of the layout (Megatron-Core's TransformerConfig)")
        flat = "".join(stages)  # stage v * pp + p: Megatron's layer id order
        rule = "Megatron-Core's PipelineParallelLayerLayout.validate_layer_layout"
        if "m" in flat:
            mtp_stages = [k for k, stage in enumerate(stages) if "m" in stage]
            k = mtp_stages[0]
            for ok, what in (("t" not in flat[flat.index("m"):], "decoder layers must be placed before MTP layers"),
                             (len(mtp_stages) == 1, "all of the MTP layers must be in the same one virtual pipeline "
                                                    "stage"),
                             (k // pp == vpp - 1, "the MTP layers must be in the last virtual pipeline stage of "
                                                  "their pipeline rank")):
                if not ok:
                    raise ConversionError(f"{where}: Megatron-Core's PipelineParallelLayerLayout.validate_layer_layout: "
                                          f"{what}")
        for ok, what in ((flat[:1] == "E", "the first layer must be the embedding (E)"),
                         (flat[-1:] == "L", "the last layer must be the loss (L)"),
                         (flat.count("E") == 1, "the embedding (E) must appear exactly once"),
                         (flat.count("L") == 1, "the loss (L) must appear exactly once"),
                         (flat.count("t") == num_layers,
                          f"it holds {flat.count('t')} decoder layers (t), num_hidden_layers is {num_layers}")):
            if not ok:
                raise ConversionError(f"{where}: {rule}: {what}")
        return [[stages[v * pp + p].count("t") for v in range(vpp)] for p in range(pp)]

    def mtp_stage(self) -> tuple[int, int]:
        """(pipeline rank, virtual chunk) holding the multi-token-prediction block: where a layout string puts
        `m`, else the last stage (Megatron-Core's mtp_on_this_rank)."""
        if self.stage_layout is not None:
            stages = parse_stage_layout(self.stage_layout)
            k = next((k for k, stage in enumerate(stages) if "m" in stage), len(stages) - 1)
            return k % self.pp, k // self.pp
        return self.pp - 1, self.chunks - 1

    def _validate_mtp(self, cfg: ModelConfig) -> None:
        if self.stage_layout is None:
            return
        count = "".join(parse_stage_layout(self.stage_layout)).count("m")
        if count != cfg.mtp_layers:
            raise ConversionError(f"--pipeline-model-parallel-layout {self.stage_layout!r}: Megatron-Core's "
                                  f"PipelineParallelLayerLayout.validate_layer_layout: it holds {count} MTP layers (m), "
                                  f"the model {cfg.mtp_layers} (mtp_num_layers)"
                                  + ("; pass --drop-mtp to convert without them" if cfg.mtp_layers else ""))

    def chunk_offsets(self, num_layers: int) -> list[list[int]]:
        """Global index of each chunk's first layer, [pipeline rank][virtual chunk]: layers are numbered chunk
        by chunk, virtual chunk first, then pipeline rank (Megatron-Core's get_transformer_layer_offset)."""
        counts = self.chunk_layers(num_layers)
        offsets = [[0] * self.chunks for _ in range(self.pp)]
        n = 0
        for v in range(self.chunks):
            for p in range(self.pp):
                offsets[p][v] = n
                n += counts[p][v]
        return offsets

    def _validate_experts(self, cfg: ModelConfig) -> None:
        if not cfg.num_experts:
            for flag, used in (("--ep", self.ep > 1), ("--etp", self.etp is not None),
                               ("--moe-grouped-gemm", self.moe_grouped_gemm)):
                if used:
                    raise ConversionError(f"{flag}: {cfg.architecture} has no experts (config.json declares none)")
            return
        if cfg.num_experts % self.ep:
            raise ConversionError(f"--ep {self.ep}: num_experts = {cfg.num_experts} is not divisible by the "
                                  f"expert-parallel size")
        if cfg.moe_ffn_hidden_size % self.expert_tp:
            flag = f"--etp {self.etp}" if self.etp else f"--tp {self.tp} (the expert TP size when --etp is omitted)"
            raise ConversionError(f"{flag}: the expert FFN size (moe_intermediate_size) = {cfg.moe_ffn_hidden_size} "
                                  f"is not divisible by the expert tensor-parallel size")
        if self.ckpt_format == "torch" and self.tp % self.expert_tp:
            # A legacy checkpoint is one file per (tp, pp, ep): the Megatron job it implies has TP x EP ranks
            # per stage, and each file's experts must be one expert-TP shard, so ETP x EP must divide TP x EP.
            raise ConversionError(
                f"--etp {self.expert_tp} --ep {self.ep}: the expert grid (ETP x EP = {self.expert_tp * self.ep}) does "
                f"not fit the {self.tp * self.ep} ranks per stage that a legacy (torch) checkpoint of --tp {self.tp} "
                f"--ep {self.ep} implies; use an --etp that divides --tp, or --ckpt-format torch_dist")

    def padded_vocab(self, vocab: int) -> int:
        return padded_vocab_size(vocab, self.make_vocab_size_divisible_by, self.tp)

    def layer_placement(self, num_layers: int) -> list[tuple[int, int, int]]:
        """(pipeline rank, virtual chunk, local index) of each global layer."""
        counts, offsets = self.chunk_layers(num_layers), self.chunk_offsets(num_layers)
        placement = [(0, 0, 0)] * num_layers
        for p in range(self.pp):
            for v in range(self.chunks):
                for j in range(counts[p][v]):
                    placement[offsets[p][v] + j] = (p, v, j)
        return placement

    def place(self, rule, layer: int | None, placement: list[tuple[int, int, int]]) -> tuple[int, int, int | None]:
        """(pipeline rank, virtual chunk, local layer index) of one instance of a rule: decoder layers by
        `placement`, a second stack (a vision encoder) whole on the first stage, other tensors on the first
        or last stage (`Rule.home`); multi-token-prediction layers on the MTP stage."""
        if rule.mtp or rule.home == "mtp":
            return self.mtp_stage() + (layer,)
        if layer is None:
            return (0, 0, None) if rule.home == "first" else (self.pp - 1, self.chunks - 1, None)
        return (0, 0, layer) if rule.stack else placement[layer]

    def legacy_rank_file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        """A rank file's path inside the iteration folder."""
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.pp > 1 else "") + (
            f"_{ep_rank:03d}" if self.ep > 1 else "")
        return f"{name}/model_optim_rng.pt"

    def legacy_file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0, iteration: int = 1) -> str:
        return f"iter_{iteration:07d}/{self.legacy_rank_file(tp_rank, pp_rank, ep_rank)}"

    def container(self, chunk: int) -> str:
        return f"model{chunk}" if self.vpp else "model"


LAYOUT_SYMBOLS = {"E": "embedding", "L": "loss", "t": "decoder", "m": "mtp"}


def parse_stage_layout(text: str) -> list[str]:
    """A --pipeline-model-parallel-layout string as one string of layer symbols per stage, in Megatron-Core's
    stage order (virtual chunk v of pipeline rank p is stage v * pp + p). As PipelineParallelLayerLayout reads
    it: commas are cosmetic, `(...)*n` and then `x*n` repeat, `|` ends a stage."""
    expanded = text.replace(",", "")
    expanded = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), expanded)
    expanded = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), expanded)
    stages = expanded.split("|")
    for stage in stages:
        bad = next((c for c in stage if c not in LAYOUT_SYMBOLS), None)
        if bad is not None:
            raise ConversionError(f"--pipeline-model-parallel-layout {text!r}: invalid layer character {bad!r} in "
                                  f"stage {stage!r}; Megatron-Core knows {', '.join(LAYOUT_SYMBOLS)} "
                                  f"({', '.join(LAYOUT_SYMBOLS.values())})")
    return stages


DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size="5GB"


@dataclass(frozen=True)
class HFLayout:
    """An HF safetensors folder as the destination: shard files of at most `max_shard_bytes`."""

    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    dtype: str | None = None
    ckpt_format: str = "hf"

    def validate(self, cfg: ModelConfig) -> None:
        if self.max_shard_bytes < 1:
            raise ConversionError(f"--max-shard-size {self.max_shard_bytes}: must be positive")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConversionError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")

    def padded_vocab(self, vocab: int) -> int:
        return vocab


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB`, `1000000`: bytes, as transformers' max_shard_size reads them."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    t = str(text).strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number):]])
    except (KeyError, ValueError):
        raise ConversionError(f"--max-shard-size {text}: not a size like 5GB, 500MB or 2GiB") from None
