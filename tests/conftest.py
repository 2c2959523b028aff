import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multigpu"))

from dist_reshard.testing.tiny_models import VARIANTS, build_model, save_model  # noqa: E402


def torchrun(nproc: int, *args: str, timeout: float = 300, check: bool = True,
             gpus: str = "") -> subprocess.CompletedProcess:
    """A real multi-process torchrun job on gloo (CPU), from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=gpus)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_cases(nproc: int, cases: list[dict], workdir) -> None:
    path = os.path.join(str(workdir), f"cases_{nproc}.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(nproc, "tests/workers/convert_many.py", path, timeout=900)


def mcore_check(nproc: int, cases: list[dict], workdir) -> list[dict]:
    """tests/workers/mcore_check.py on these cases (convert, load into Megatron-Core, logits vs HF): its results."""
    path, out = os.path.join(str(workdir), "cases.json"), os.path.join(str(workdir), "results.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    torchrun(nproc, "tests/workers/mcore_check.py", path, out, timeout=900)
    with open(out) as f:
        return json.load(f)


def moe_family_job(models: dict, workdir) -> dict:
    """One 4-rank mcore_check job over the MoE family suites' tiny models: each to legacy TP2 x PP2 x EP2 and
    torch_dist TP2 x EP2 (local spec), loaded into Megatron-Core, and back to HF; results by "<variant>-<fmt>"."""
    cases = [dict(tp=2, pp=2 if fmt == "torch" else 1, ep=2, etp=1, load=folder, save=os.path.join(
        str(workdir), f"{v}-{fmt}"), format=fmt, impl="local", name=f"{v}-{fmt}",
        back=os.path.join(str(workdir), f"{v}-{fmt}-back")) for v, folder in models.items()
        for fmt in ("torch", "torch_dist")]
    back = [dict(dst="hf", load=c["save"], save=c["back"]) for c in cases]
    return {r["name"]: r for r in mcore_check(4, cases + back, workdir)}


def assert_same_hf(original: str, back: str) -> None:
    """Two HF folders hold the same tensors, byte for byte, and the same config.json."""
    want, got = load_hf_state(original), load_hf_state(back)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), name
    with open(os.path.join(original, "config.json")) as f, open(os.path.join(back, "config.json")) as g:
        assert json.load(g) == json.load(f)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Each family variant as a tiny seeded float32 HF folder with several safetensors shards."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for variant in VARIANTS:
        folder = str(root / variant)
        model = build_model(variant, seed=sum(map(ord, variant)))
        save_model(model, folder)
        out[variant] = folder
    # A bf16 source: the dtype most published checkpoints use.
    folder = str(root / "llama3_bf16")
    save_model(build_model("llama3", seed=5, dtype="bfloat16"), folder)
    out["llama3_bf16"] = folder
    # Rows wide enough for a row-parallel shard's block of each row (1 KiB at TP2 in float32) to be copied
    # file to file row by row (dist_reshard/writers/pass_through.py); the tiny models' blocks are below that.
    folder = str(root / "llama3_wide")
    save_model(build_model("llama3", seed=13, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                           vocab_size=256), folder, max_shard_size="2MB")
    out["llama3_wide"] = folder
    # DeepSeek-V3 as published: bf16 weights block-quantized to FP8 (16 x 16 blocks here, so tensors span
    # several blocks and partial ones), beside the bf16 tensors the FP8 ones decode to.
    from fp8_reference import make_fp8_pair

    bf16 = str(root / "deepseek_v3_bf16")
    save_model(build_model("deepseek_v3", seed=11, dtype="bfloat16"), bf16)
    out["deepseek_v3_fp8"], out["deepseek_v3_fp8_dequantized"] = str(root / "deepseek_v3_fp8"), str(
        root / "deepseek_v3_fp8_dequantized")
    make_fp8_pair(bf16, out["deepseek_v3_fp8"], out["deepseek_v3_fp8_dequantized"], (16, 16))
    # NaN and Inf are data, not errors: they must pass through bit for bit (bf16, with a NaN payload).
    model = build_model("llama3", seed=9, dtype="bfloat16")
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
        w.view(torch.int16)[1, 0] = 0x7FC1  # a NaN with a non-default payload
        model.model.layers[1].mlp.down_proj.weight[5, 7] = float("nan")
        model.model.norm.weight[2] = float("-inf")
    folder = str(root / "llama3_nan")
    save_model(model, folder)
    out["llama3_nan"] = folder
    return out


def load_hf_state(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
    return state


def load_hf_config(folder: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def tree_hashes(folder) -> dict:
    """SHA-256 of every file below folder; the manifest by its content minus the command line."""
    import hashlib

    out = {}
    for root, _d, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel == "dist_reshard.json":
                with open(path) as f:
                    man = json.load(f)
                man.pop("command")
                out[rel] = man
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def edited_copy(model: str, folder, drop: tuple = (), **changes) -> str:
    """A copy of the HF folder `model` at `folder` whose config.json lacks `drop` and has `changes`."""
    import shutil

    shutil.copytree(model, folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(folder)


def plan_hf(folder: str, layout=None, world: int = 2):
    """The plan of converting the HF folder at `layout` (default TP2) on `world` ranks: where refusals are raised."""
    from dist_reshard.config.layout import TargetLayout
    from dist_reshard.plan.planner import make_plan
    from dist_reshard.source.hf_source import open_hf_folder

    cfg, family, index = open_hf_folder(folder)
    return make_plan(family, index, cfg, layout or TargetLayout(tp=2), world=world)


def with_extra_tensors(model: str, folder, tensors: dict) -> str:
    """A copy of the HF folder `model` at `folder` with `tensors` added in a shard file of their own."""
    import shutil

    from dist_reshard.testing.tiny_models import add_tensors

    shutil.copytree(model, folder)
    add_tensors(str(folder), tensors, "extra.safetensors")
    return str(folder)

