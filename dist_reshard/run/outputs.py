"""What an output holds beside its tensors: the Megatron args (carried over from a Megatron source) and, for
HF output, the shard index and the config and tokenizer files."""

from __future__ import annotations

from ..config.layout import DTYPE_FLAGS
from ..config.megatron_args import PIPELINE_ARGS, megatron_args
from ..plan.data import Plan
from ..writers import hf
from .options import Options


_HYBRID_ARGS = ("is_hybrid_model", "hybrid_override_pattern", "spec", "model_type_name")


def output_args(opts: Options, plan: Plan, cfg, family, source):
    """Megatron args of the output; from a Megatron source, its own args carried over with the new layout."""
    qk_norm = any("q_layernorm" in t.key for t in plan.targets)
    source_dtype = cfg.dtype
    if source is not None:
        source_dtype = DTYPE_FLAGS.get(next(iter(source.logical.values())).dtype)
    args = megatron_args(cfg, opts.layout, plan.padded_vocab, family.name, source_dtype, qk_norm)
    if source is not None:
        from ..source.megatron_source import true_vocab_known

        if not true_vocab_known(source, opts.vocab_size):  # padded rows only: still unknown, never invented
            args.vocab_size = args.true_vocab_size = None
        for k, v in vars(source.args).items():  # training flags and the stored HF config travel along
            if k in _HYBRID_ARGS and not cfg.hybrid:
                continue  # a hybrid laid out as GPTModel again (--layer-pattern gpt)
            if k in PIPELINE_ARGS:
                continue  # the new layout's split, even where it leaves a field None
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    if getattr(opts.layout, "legacy_gpt", False):
        from ..families.legacy_gpt import ARGS

        vars(args).update(ARGS)
    return args


def write_hf_metadata(opts: Options, plan: Plan, cfg, family, source, staging: str) -> list[str]:
    """Rank 0, HF output: the shard index (when there are several files) and config/tokenizer files."""
    from ..config.hf_export import hf_config
    from ..plan.targets import build_hf_targets, kept_dtypes

    # The whole file set, also when a resumed plan covers only the files still missing.
    pairs, paths = build_hf_targets(source.logical, cfg, opts.layout, kept_dtypes(family, cfg))
    names = []
    if paths != ["model.safetensors"]:
        hf.write_index(staging, {t.key: paths[k[0]] for k, t in pairs}, sum(t.nbytes for _, t in pairs))
        names.append("model.safetensors.index.json")
    dtype = opts.layout.dtype or DTYPE_FLAGS.get(pairs[0][1].dtype)
    names += hf.write_config(staging, hf_config(cfg, dtype, opts.hf_config), opts.hf_config)
    return names
