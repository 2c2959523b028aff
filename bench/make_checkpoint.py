"""Write a realistic HF safetensors checkpoint of a chosen size without building a model.

    python bench/make_checkpoint.py OUT_DIR --size-gb 4 [--family llama|mixtral] [--shard-gb 2]
        [--scale auto|1|2|4|...] [--layers N] [--layer-multiple 2] [--dtype bf16|fp16|fp32]

The output has what `save_pretrained` writes for the family: `config.json` (transformers style),
`model-0000k-of-0000n.safetensors` shards of about `--shard-gb` each, filled greedily in the model's
state-dict order, and `model.safetensors.index.json`. Tensor names and shapes are the family's real ones
(Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256; Mixtral-8x7B: the same
with 8 experts and vocab 32000); only the number of layers is chosen, so that the total is close to
`--size-gb` (decimal GB, as HF's shard sizes are).

Sizes too small for two full-width layers (about 3 GB for Llama) shrink hidden, intermediate and vocab
by a power of two (`--scale auto`), keeping the head counts, so the layout stays GQA-shaped; the chosen
scale is printed and written into the config.

The data is random, yet written at disk speed: one random pool (64 MiB) is drawn once and every tensor
is a copy of it starting at its own offset, so no two tensors share bytes at the same position. Bit 6 of
each odd byte is cleared in the pool: for bf16 and fp16 (and fp32's top byte) that is the exponent's top
bit, so every value is finite (|x| < 2) and the checkpoint survives a numeric compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import sys

GB = 10**9
POOL_BYTES = 64 << 20

DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "fp16": ("F16", 2, "float16"), "fp32": ("F32", 4, "float32")}

# Published configs of the two families (Llama-3-8B, Mixtral-8x7B-v0.1), minus the layer count.
BASE_CONFIGS = {
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "bos_token_id": 128000, "eos_token_id": 128001,
        "tie_word_embeddings": False, "use_cache": True, "transformers_version": "4.40.0",
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
        "output_router_logits": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "use_cache": True,
        "transformers_version": "4.36.0",
    },
}
SCALED_KEYS = ("hidden_size", "intermediate_size", "vocab_size")


def scaled_config(family: str, scale: int, layers: int, dtype: str) -> dict:
    cfg = dict(BASE_CONFIGS[family])
    for key in SCALED_KEYS:
        if cfg[key] % scale:
            raise ValueError(f"--scale {scale}: {key} {cfg[key]} is not divisible by it")
        cfg[key] //= scale
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"--scale {scale}: hidden_size {cfg['hidden_size']} is no longer a multiple of the "
                         f"{cfg['num_attention_heads']} heads")
    cfg["num_hidden_layers"] = layers
    cfg["torch_dtype"] = DTYPES[dtype][2]
    if scale != 1:
        cfg["_bench_scale"] = scale  # not a transformers field: says this is a shrunken shape
    return cfg


def layer_shapes(cfg: dict, i: int) -> list[tuple[str, tuple[int, ...]]]:
    """One decoder layer's tensors, in the module order a state dict lists them."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    p = f"model.layers.{i}."
    out = [(p + "self_attn.q_proj.weight", (heads * d, h)), (p + "self_attn.k_proj.weight", (groups * d, h)),
           (p + "self_attn.v_proj.weight", (groups * d, h)), (p + "self_attn.o_proj.weight", (h, heads * d))]
    if "num_local_experts" in cfg:
        e = cfg["num_local_experts"]
        out.append((p + "block_sparse_moe.gate.weight", (e, h)))
        for j in range(e):
            q = f"{p}block_sparse_moe.experts.{j}."
            out += [(q + "w1.weight", (f, h)), (q + "w2.weight", (h, f)), (q + "w3.weight", (f, h))]
    else:
        out += [(p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out


def model_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        out += layer_shapes(cfg, i)
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def _bytes(shapes, itemsize: int) -> int:
    return sum(math.prod(s) for _, s in shapes) * itemsize


def _fixed_and_layer_bytes(family: str, scale: int, dtype: str) -> tuple[int, int]:
    """Bytes outside the layers (embeddings, final norm, head) and bytes of one layer."""
    itemsize = DTYPES[dtype][1]
    cfg = scaled_config(family, scale, 0, dtype)
    return _bytes(model_shapes(cfg), itemsize), _bytes(layer_shapes(cfg, 0), itemsize)


def choose_shape(family: str, size_bytes: int, scale: str | int = "auto", layers: int | None = None,
                 layer_multiple: int = 2, dtype: str = "bf16") -> tuple[int, int]:
    """(scale, layers): the layer count (a multiple of `layer_multiple`, so PP of that size divides it)
    whose total is closest to `size_bytes`; with scale "auto", the smallest power-of-two shrink for which
    `layer_multiple` layers still fit."""
    if scale == "auto":
        s = 1
        while True:
            fixed, per = _fixed_and_layer_bytes(family, s, dtype)
            if layers is not None or fixed + layer_multiple * per <= size_bytes:
                break
            if BASE_CONFIGS[family]["hidden_size"] // (2 * s) < BASE_CONFIGS[family]["num_attention_heads"]:
                break  # the smallest shape there is; take it
            s *= 2
        scale = s
    scale = int(scale)
    fixed, per = _fixed_and_layer_bytes(family, scale, dtype)
    if layers is None:
        k = max(1, round((size_bytes - fixed) / (per * layer_multiple)))
        layers = k * layer_multiple
    return scale, layers


def _random_pool(seed: int) -> bytearray:
    # random.Random.randbytes is seeded, so the same arguments give the same files.
    pool = bytearray(random.Random(seed).randbytes(POOL_BYTES))
    # Clear the exponent's top bit in the high byte of every 2-byte element (little-endian): finite values.
    pool[1::2] = pool[1::2].translate(bytes(b & 0xBF for b in range(256)))
    return pool


def _write_data(f, pool: memoryview, nbytes: int, start: int) -> None:
    pos = start
    while nbytes:
        n = min(nbytes, len(pool) - pos)
        f.write(pool[pos:pos + n])
        nbytes -= n
        pos = 0


def _shard(shapes, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """save_pretrained's greedy split: a tensor starts a new shard when it would overflow the current one."""
    shards, current, size = [], [], 0
    for name, shape in shapes:
        n = math.prod(shape) * itemsize
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    if current:
        shards.append(current)
    return shards


def write_safetensors(path: str, tensors, st_dtype: str, itemsize: int, pool: memoryview, rng: random.Random) -> int:
    """One safetensors file written by hand: u64 LE header length, JSON header padded with spaces to a
    multiple of 8, then the data (tensors in name order, as safetensors' own writer sorts them)."""
    tensors = sorted(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            # An even start keeps 2-byte elements aligned with the pool's exponent mask.
            _write_data(f, pool, math.prod(shape) * itemsize, 2 * rng.randrange(len(pool) // 2))
        f.flush()
        # Durable before the benchmark starts, so its first `sync` does not pay for our write-back.
        os.fsync(f.fileno())
    return offset


def make_checkpoint(folder: str, size_gb: float = 4.0, family: str = "llama", shard_gb: float = 2.0,
                    scale: str | int = "auto", layers: int | None = None, layer_multiple: int = 2,
                    dtype: str = "bf16", seed: int = 0) -> dict:
    """Write the checkpoint; returns a summary (config, files, total_size)."""
    if family not in BASE_CONFIGS:
        raise ValueError(f"--family {family}: choose one of {', '.join(BASE_CONFIGS)}")
    st_dtype, itemsize, _ = DTYPES[dtype]
    scale, layers = choose_shape(family, int(size_gb * GB), scale, layers, layer_multiple, dtype)
    cfg = scaled_config(family, scale, layers, dtype)
    shapes = model_shapes(cfg)
    shards = _shard(shapes, itemsize, max(1, int(shard_gb * GB)))
    os.makedirs(folder, exist_ok=True)
    pool = memoryview(_random_pool(seed))
    rng = random.Random(seed + 1)
    weight_map, files, total = {}, [], 0
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(folder, fname), tensors, st_dtype, itemsize, pool, rng)
        weight_map.update({name: fname for name, _ in tensors})
        files.append(fname)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"folder": folder, "family": family, "scale": scale, "layers": layers, "dtype": dtype,
            "total_size": total, "files": files, "tensors": len(shapes), "config": cfg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (created; existing files of the same names are replaced)")
    p.add_argument("--size-gb", type=float, default=4.0, help="target total tensor bytes, decimal GB")
    p.add_argument("--family", choices=sorted(BASE_CONFIGS), default="llama")
    p.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size, decimal GB")
    p.add_argument("--scale", default="auto",
                   help="divide hidden, intermediate and vocab by this power of two (auto: 1 when it fits)")
    p.add_argument("--layers", type=int, default=None, help="exact layer count (overrides --size-gb)")
    p.add_argument("--layer-multiple", type=int, default=2, help="layer count is a multiple of this (PP sizes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    try:
        s = make_checkpoint(ns.out, ns.size_gb, ns.family, ns.shard_gb, ns.scale, ns.layers, ns.layer_multiple,
                            ns.dtype, ns.seed)
    except ValueError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return 2
    c = s["config"]
    print(f"{s['folder']}: {c['architectures'][0]} scale 1/{s['scale']} (hidden {c['hidden_size']}, intermediate "
          f"{c['intermediate_size']}, vocab {c['vocab_size']}), {s['layers']} layers, {s['tensors']} tensors, "
          f"{s['total_size'] / GB:.3f} GB in {len(s['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
