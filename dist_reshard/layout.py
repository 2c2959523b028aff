"""The target Megatron layout: parallel sizes, pipeline placement of layers, vocabulary padding."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError
from .hf_config import ModelConfig
from .mapping import padded_vocab_size

CKPT_FORMATS = ("torch_dist", "torch")
TRANSFORMER_IMPLS = ("transformer_engine", "local")
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DTYPE_FLAGS = {v: k for k, v in DTYPES.items()}  # safetensors name -> --dtype value
AUTO_MIN_CHUNK_BYTES = 64 << 20  # torch_dist chunks are not cut below this by the automatic bound


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
        stages = self.pp * self.chunks
        if cfg.num_layers % stages:
            where = f"--pp {self.pp}" + (f" x --vpp {self.vpp}" if self.vpp else "")
            raise ConversionError(f"{where}: num_hidden_layers = {cfg.num_layers} is not divisible into "
                                  f"{stages} equal pipeline chunks")

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
        """(pipeline rank, virtual chunk, local index) of each global layer.

        Megatron's interleaved schedule puts chunk v of stage p at offset v*L/vpp + p*L/(pp*vpp).
        """
        per = num_layers // (self.pp * self.chunks)
        placement = [(0, 0, 0)] * num_layers
        for v in range(self.chunks):
            for p in range(self.pp):
                first = v * num_layers // self.chunks + p * per
                for j in range(per):
                    placement[first + j] = (p, v, j)
        return placement

    def place(self, rule, layer: int | None, placement: list[tuple[int, int, int]]) -> tuple[int, int, int | None]:
        """(pipeline rank, virtual chunk, local layer index) of one instance of a rule: decoder layers by
        `placement`, a second stack (a vision encoder) whole on the first stage, other tensors on the first
        or last stage (`Rule.home`)."""
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
