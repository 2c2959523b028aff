"""The embedded default job: `python -m dist_reshard.demo`.

Builds a tiny seeded HF Llama, converts it on 2 CPU ranks with torchrun (TP2, torch_dist by default),
loads the result into real Megatron-Core GPTModels on 2 CPU ranks, and prints the logits check
against the HF model. Needs the test extras (transformers, megatron-core).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

TOLERANCE = 1e-4


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="")
    env.setdefault("LOGLEVEL", "ERROR")
    # Megatron and transformers warn about CUDA-only features and deprecations on a CPU; the demo's
    # output is the conversion summary and the logits check.
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TQDM_DISABLE", "1")
    print("$ torchrun " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, env=env, check=True)


def check(hf_dir: str, save: str, tp: int, pp: int, fmt: str) -> None:
    """torchrun worker: load `save` into Megatron-Core at TPxPP and compare logits with the HF model."""
    import torch
    import torch.distributed as dist

    from ..testing import mcore_cpu

    dist.init_process_group("gloo")
    mcore_cpu.init_parallel(tp, pp)
    from megatron.core import parallel_state as ps

    folder = os.path.join(save, "iter_0000001")
    if fmt == "torch":
        name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else ""
        state = torch.load(os.path.join(folder, name, "model_optim_rng.pt"), weights_only=False)
        models = mcore_cpu.build_gpt_models(state["args"])
        models[0].load_state_dict(state["model"], strict=True)
        args = state["args"]
    else:
        args = torch.load(os.path.join(folder, "common.pt"), weights_only=False)["args"]
        models = mcore_cpu.build_gpt_models(args)
        mcore_cpu.load_torch_dist(models, folder)
    tokens = torch.randint(0, args.true_vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = mcore_cpu.forward_logits(models, tokens)[..., :args.true_vocab_size]
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf(tokens).logits.float()
        rel = mcore_cpu.relative_difference(logits, expected)
        ok = rel <= TOLERANCE
        print(f"logits check: Megatron-Core (TP{tp} PP{pp}, {fmt}) vs HF: max relative difference "
              f"{rel:.2e} (tolerance {TOLERANCE:.0e}) -> {'OK' if ok else 'MISMATCH'}", flush=True)
        code = 0 if ok else 1
    else:
        code = 0
    dist.barrier()
    sys.stdout.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dist_reshard.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="where the HF model and the output go (default: a temp dir)")
    p.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--check", nargs=2, metavar=("HF_DIR", "SAVE"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.check:
        check(ns.check[0], ns.check[1], ns.tp, ns.pp, ns.ckpt_format)
        return 0
    if ns.tp * ns.pp != 2:
        p.error("the demo runs on 2 CPU ranks: --tp x --pp must be 2")
    workdir = ns.workdir or tempfile.mkdtemp(prefix="dist_reshard_demo_")
    hf_dir, save = os.path.join(workdir, "hf_llama"), os.path.join(workdir, "mcore")
    from ..testing.tiny_models import build_model, save_model

    save_model(build_model("llama3", seed=0), hf_dir)
    print(f"built a tiny seeded HF Llama in {hf_dir}", flush=True)
    _torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_dir, "--save", save,
              "--tp", str(ns.tp), "--pp", str(ns.pp), "--ckpt-format", ns.ckpt_format, "--transformer-impl", "local",
              "--overwrite", "--report", os.path.join(workdir, "report.json"))
    try:
        _torchrun(2, "-m", "dist_reshard.demo", "--check", hf_dir, save, "--tp", str(ns.tp), "--pp", str(ns.pp),
                  "--ckpt-format", ns.ckpt_format)
    except subprocess.CalledProcessError:
        return 1
    print(f"output: {save}  report: {os.path.join(workdir, 'report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
