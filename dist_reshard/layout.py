"""The target Megatron layout: parallel sizes, pipeline placement of layers, vocabulary padding."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError
from .hf_config import ModelConfig
from .mapping import padded_vocab_size

CKPT_FORMATS = ("torch_dist", "torch")
TRANSFORMER_IMPLS = ("transformer_engine", "local")
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


@dataclass(frozen=True)
class TargetLayout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ckpt_format: str = "torch_dist"
    transformer_impl: str = "transformer_engine"
    make_vocab_size_divisible_by: int = 128
    dtype: str | None = None  # "bf16" | "fp16" | "fp32"; None keeps each source tensor's dtype

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def validate(self, cfg: ModelConfig) -> None:
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--vpp", self.vpp or 1),
                            ("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by)):
            if value < 1:
                raise ConversionError(f"{flag} {value}: must be a positive integer")
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConversionError(f"--ckpt-format {self.ckpt_format}: choose one of {', '.join(CKPT_FORMATS)}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConversionError(f"--transformer-impl {self.transformer_impl}: choose one of "
                                  f"{', '.join(TRANSFORMER_IMPLS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConversionError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.vpp and self.pp < 2:
            raise ConversionError(f"--vpp {self.vpp} needs --pp of at least 2 (Megatron interleaves over stages)")
        for what, n in (("num_attention_heads", cfg.num_attention_heads),
                        ("num_query_groups (num_key_value_heads)", cfg.num_query_groups),
                        ("ffn_hidden_size (intermediate_size)", cfg.ffn_hidden_size)):
            if n % self.tp:
                raise ConversionError(f"--tp {self.tp}: {what} = {n} is not divisible by the tensor-parallel size")
        if cfg.num_attention_heads % cfg.num_query_groups:
            raise ConversionError(f"config.json: num_attention_heads {cfg.num_attention_heads} is not a multiple "
                                  f"of num_key_value_heads {cfg.num_query_groups}")
        stages = self.pp * self.chunks
        if cfg.num_layers % stages:
            where = f"--pp {self.pp}" + (f" x --vpp {self.vpp}" if self.vpp else "")
            raise ConversionError(f"{where}: num_hidden_layers = {cfg.num_layers} is not divisible into "
                                  f"{stages} equal pipeline chunks")

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

    def legacy_file(self, tp_rank: int, pp_rank: int, iteration: int = 1) -> str:
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.pp > 1 else "")
        return f"iter_{iteration:07d}/{name}/model_optim_rng.pt"

    def container(self, chunk: int) -> str:
        return f"model{chunk}" if self.vpp else "model"
