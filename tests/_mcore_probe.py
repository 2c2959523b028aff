"""Probe: what real Megatron-Core 0.16.1 writes for a tiny GPT at a given layout (CPU, gloo).

torchrun --nproc-per-node N tests/_mcore_probe.py TP PP [VPP|0] [--tied] [--qk-norm] [--qkv-bias] [--out DIR]
Prints legacy state_dict keys per chunk, the torch_dist DCP metadata, common.pt and metadata.json,
then reloads the folder into a fresh model and checks the logits are identical.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_args(tp, pp, vpp, tied, qk_norm, qkv_bias):
    return argparse.Namespace(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, max_position_embeddings=128, rotary_base=10000, rotary_percent=1.0,
        use_rope_scaling=False, rope_scaling_factor=8.0, swiglu=True, normalization="RMSNorm",
        norm_epsilon=1e-5, add_qkv_bias=qkv_bias, add_bias_linear=False, qk_layernorm=qk_norm,
        untie_embeddings_and_output_weights=not tied, padded_vocab_size=256,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tp", type=int)
    ap.add_argument("pp", type=int)
    ap.add_argument("vpp", type=int, nargs="?", default=0)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument("--qkv-bias", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    vpp = a.vpp or None

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from dist_reshard import mcore_cpu as mc

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mc.apply_cpu_patches()
    mc.init_parallel(a.tp, a.pp, vpp)
    args = tiny_args(a.tp, a.pp, vpp, a.tied, a.qk_norm, a.qkv_bias)
    models = mc.build_gpt_models(args)

    def say(*x):
        print(f"[rank {rank}]", *x, flush=True)

    for i, m in enumerate(models):
        sd = m.state_dict()
        lines = []
        for k, t in sd.items():
            desc = tuple(t.shape) if torch.is_tensor(t) else f"{type(t).__name__}={t!r}"[:80]
            lines.append(f"  {k}: {desc}")
        say(f"chunk {i} pre={m.pre_process} post={m.post_process} legacy keys:\n" + "\n".join(lines))
        m.load_state_dict(sd, strict=True)

    tokens = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = mc.forward_logits(models, tokens)

    out = a.out
    if out is None:
        out = [tempfile.mkdtemp(prefix="mcore_probe_") if rank == 0 else None]
        dist.broadcast_object_list(out, src=0)
        out = out[0]
    dist_checkpointing.save(mc.sharded_state_dict(models), out)
    dist.barrier()

    if rank == 0:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = FileSystemReader(out).read_metadata()
        print("== DCP state_dict_metadata ==")
        for k, v in sorted(md.state_dict_metadata.items()):
            if isinstance(v, TensorStorageMetadata):
                chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks]
                print(f"  T {k}: {tuple(v.size)} {v.properties.dtype} chunks={chunks}")
            else:
                print(f"  O {k}: {type(v).__name__}")
        objs = sorted(k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata))
        if objs:
            import io
            import torch.distributed.checkpoint as dcp

            bufs = {k: io.BytesIO() for k in objs[:1]}
            dcp.load(bufs, storage_reader=FileSystemReader(out), no_dist=True)
            # DCP's default load planner torch.load()s the stored bytes itself
            print(f"== object {objs[0]} loads as:", repr(bufs[objs[0]])[:300])
        print("== planner_data ==", repr(md.planner_data)[:600])
        print("== storage_meta ==", repr(md.storage_meta))
        print("== files ==", sorted(os.listdir(out)))
        common = torch.load(os.path.join(out, "common.pt"), weights_only=False)
        print("== common.pt ==", repr(common)[:2000])
        with open(os.path.join(out, "metadata.json")) as f:
            print("== metadata.json ==", json.load(f))
        sys.stdout.flush()
    dist.barrier()

    torch.manual_seed(999)  # fresh model with different weights
    fresh = mc.build_gpt_models(args)
    before = mc.forward_logits(fresh, tokens)
    mc.load_torch_dist(fresh, out)
    got = mc.forward_logits(fresh, tokens)
    assert got.shape == (2, 8, 256), got.shape
    differed = not torch.equal(before, ref)
    ok = torch.equal(got, ref)
    say(f"logits {tuple(got.shape)} fresh-differed={differed} reload-equal={ok} "
        f"maxdiff={(got - ref).abs().max().item():.3g}")
    assert differed and ok
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
