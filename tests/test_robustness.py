"""Never a broken checkpoint: failures on one rank end every rank, a killed job resumes to a
byte-identical result, the manifest and verifier catch tampering, and full or read-only disks fail clean."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, torchrun, tree_hashes

CONVERT = ["-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--tp", "2", "--pp", "2"]




def _run(load, save, *extra, fault=None, check=False):
    env_fault = {"DIST_RESHARD_FAULT": fault} if fault else {}
    old = {k: os.environ.get(k) for k in env_fault}
    os.environ.update(env_fault)
    try:
        start = time.monotonic()
        proc = torchrun(2, *CONVERT, "--load", load, "--save", str(save), *extra, check=check, timeout=120)
        return proc, time.monotonic() - start
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _staging(save):
    return save.parent / f".{save.name}.dist_reshard-staging"


@pytest.mark.parametrize("fmt,point", [("torch", "write"), ("torch_dist", "exchange")])
def test_killed_rank_then_resume_is_byte_identical(hf_models, tmp_path, fmt, point):
    load = hf_models["qwen3"]
    reference = tmp_path / "reference"
    _run(load, reference, "--ckpt-format", fmt, "--quiet", check=True)
    save = tmp_path / "out"
    proc, elapsed = _run(load, save, "--ckpt-format", fmt, fault=f"1:{point}:kill")
    assert proc.returncode != 0 and elapsed < 30
    assert not save.exists(), "a killed job left something at --save"
    assert _staging(save).exists(), "the finished files of the killed job are kept for --resume"
    report = tmp_path / "report.json"
    _run(load, save, "--ckpt-format", fmt, "--resume", "--quiet", "--report", str(report), check=True)
    assert tree_hashes(save) == tree_hashes(reference)
    assert not _staging(save).exists()
    if fmt == "torch":
        job = json.loads(report.read_text())
        # Rank 1 finished one of its two files before it was killed: that file is not read again.
        assert 0 < job["bytes_read_total"] < job["source_bytes"] or job["source_bytes"] < sum(
            os.path.getsize(os.path.join(load, f)) for f in os.listdir(load) if f.endswith(".safetensors"))


def test_exception_on_one_rank_ends_every_rank(hf_models, tmp_path):
    save = tmp_path / "out"
    proc, elapsed = _run(hf_models["llama3"], save, fault="1:read:raise")
    assert proc.returncode != 0 and elapsed < 30
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2 and all("injected fault at read" in e for e in errors), proc.stderr[-2000:]
    assert any("reported by rank 1" in e for e in errors)
    assert not save.exists()


def test_silent_rank_is_detected_by_the_collective_timeout(hf_models, tmp_path):
    save = tmp_path / "out"
    proc, elapsed = _run(hf_models["llama3"], save, "--timeout", "5", fault="1:exchange:hang")
    assert proc.returncode != 0 and elapsed < 30
    assert not save.exists()


def _verify(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "dist_reshard.verify", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_verify_checksums_and_source_slices(hf_models, tmp_path, fmt):
    save = tmp_path / "out"
    _run(hf_models["qwen2"], save, "--ckpt-format", fmt, "--quiet", check=True)
    ok = _verify(str(save), "--against", hf_models["qwen2"])
    assert ok.returncode == 0, ok.stderr
    # A different source of the same architecture: every slice check must fail.
    other = _verify(str(save), "--against", hf_models["llama3"])
    assert other.returncode != 0
    # One flipped bit in one file: named by the checksum check.
    man = json.loads((save / "dist_reshard.json").read_text())
    victim = save / man["files"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    bad = _verify(str(save))
    assert bad.returncode != 0 and str(victim) in bad.stderr and "content hash" in bad.stderr


def _mount_tmpfs(path, options):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def _tmpfs(tmp_path, name, options):
    mnt = tmp_path / name
    if not _mount_tmpfs(mnt, options):
        pytest.skip(f"cannot mount a tmpfs ({options}) here: needs CAP_SYS_ADMIN")
    return mnt


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = _tmpfs(tmp_path, "small", "size=600k")
    yield mnt
    subprocess.run(["umount", str(mnt)])


@pytest.fixture
def read_only_fs(tmp_path):
    mnt = _tmpfs(tmp_path, "ro", "size=1m,ro")
    yield mnt
    subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_disk_full_is_a_clean_error(hf_models, tiny_fs, fmt):
    load = hf_models["llama3"]
    before = tree_hashes(load)
    save = tiny_fs / "out"
    proc, elapsed = _run(load, save, "--ckpt-format", fmt)
    assert proc.returncode != 0 and elapsed < 60
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert errors and all("No space left on device" in e for e in errors), proc.stderr[-2000:]
    assert os.listdir(tiny_fs) == [], "staging or partial output left behind"
    assert tree_hashes(load) == before


def test_read_only_destination_is_a_clean_error(hf_models, read_only_fs):
    proc, _ = _run(hf_models["llama3"], read_only_fs / "out")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2 and all("cannot create staging folder" in e for e in errors), proc.stderr[-2000:]


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]


@pytest.mark.parametrize("fault", ["1:allocate:raise", "1:exchange:raise", "0:unpack:raise"])
def test_exception_during_exchange_ends_every_rank_at_the_default_timeout(hf_models, tmp_path, fault):
    """Raised on one rank while it allocates its share, between its read and the all-to-all (agreed before
    it), or while unpacking what it received (agreed at the next boundary): the peer never sits in a
    collective for the default --timeout (1800 s)."""
    save = tmp_path / "out"
    proc, elapsed = _run(hf_models["llama3"], save, fault=fault)
    errors = _error_lines(proc)
    point = fault.split(":")[1]
    assert proc.returncode != 0 and elapsed < 30, (elapsed, proc.stderr[-2000:])
    assert len(errors) == 2 and all(f"injected fault at {point}" in e for e in errors), proc.stderr[-2000:]
    assert not save.exists() and not _staging(save).exists()


def _with_one_part_in(hf, folder, name, dtype):
    """A copy of an HF folder whose tensor `name` is stored in another dtype (one q_proj in F16)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, folder)
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            state = load_file(os.path.join(folder, f))
            if name in state:
                state[name] = state[name].to(getattr(torch, dtype))
                save_file(state, os.path.join(folder, f), metadata={"format": "pt"})
    return str(folder)


def test_fused_parts_of_different_dtypes_are_refused_by_name(hf_models, tmp_path):
    load = _with_one_part_in(hf_models["llama3"], tmp_path / "mixed", "model.layers.1.self_attn.q_proj.weight",
                             "float16")
    save = tmp_path / "out"
    proc, elapsed = _run(load, save, "--ckpt-format", "torch", "--timeout", "60")
    errors = _error_lines(proc)
    assert proc.returncode != 0 and elapsed < 30 and len(errors) == 2, proc.stderr[-2000:]
    assert all("parts of one output tensor differ in dtype" in e and "q_proj.weight F16" in e and "pass --dtype" in e
               for e in errors), errors
    assert not save.exists()
    # --dtype says what to write: every part is cast to it, and the slices check out against the source.
    proc, _ = _run(load, save, "--ckpt-format", "torch", "--dtype", "fp32", "--quiet", check=True)
    import torch

    shard = torch.load(save / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    assert shard["model"]["decoder.layers.0.self_attention.linear_qkv.weight"].dtype == torch.float32


def test_error_on_rank_0_alone_while_publishing_ends_every_rank(hf_models, tmp_path):
    """`--hf-config` naming another model is found by rank 0 alone, while it publishes."""
    mcore = tmp_path / "mcore"
    _run(hf_models["llama3"], mcore, "--ckpt-format", "torch", "--quiet", check=True)
    save = tmp_path / "hf_out"
    start = time.monotonic()
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "mcore", "--dst", "hf", "--load", str(mcore),
                    "--save", str(save), "--hf-config", hf_models["llama3_wide"], "--timeout", "60", check=False,
                    timeout=120)
    elapsed = time.monotonic() - start
    errors = _error_lines(proc)
    assert proc.returncode != 0 and elapsed < 30, (elapsed, proc.stderr[-2000:])
    assert len(errors) == 2 and all("--hf-config" in e for e in errors), proc.stderr[-2000:]
    assert not save.exists()


def test_resume_after_the_source_changed_under_the_same_headers_redoes_every_file(hf_models, tmp_path):
    """A fine-tune saved over the source between the crash and --resume: same names, shapes and headers,
    other weights. The files the crashed run finished came from the old weights, so none is kept."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dist_reshard.formats.manifest import source_fingerprint

    load = tmp_path / "src"
    shutil.copytree(hf_models["llama3"], load)
    save = tmp_path / "out"
    proc, _ = _run(str(load), save, "--ckpt-format", "torch", fault="1:write:kill")
    assert proc.returncode != 0 and _staging(save).exists()
    shards = sorted(str(load / f) for f in os.listdir(load) if f.endswith(".safetensors"))
    headers = source_fingerprint(shards)
    for f in shards:  # the "fine-tune": every weight doubled, in place
        save_file({k: v * 2 for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    assert source_fingerprint(shards) == headers, "the case needs identical headers"
    proc, _ = _run(str(load), save, "--ckpt-format", "torch", "--resume", "--quiet", check=True)
    assert "--resume: source file" in proc.stderr and "changed since the interrupted run" in proc.stderr
    reference = tmp_path / "reference"
    _run(str(load), reference, "--ckpt-format", "torch", "--quiet", check=True)
    assert tree_hashes(save) == tree_hashes(reference)


def test_verify_an_hf_output_and_the_stored_args(hf_models, tmp_path):
    """`verify HF_OUT --against MCORE` compares every HF tensor with the Megatron source's (it crashed on the
    HF layout); `verify MCORE --against HF` also compares the stored args with those the source gives."""
    import torch

    from dist_reshard.formats.manifest import file_digest, read_manifest, write_manifest

    mcore, hf_out = tmp_path / "mcore", tmp_path / "hf_out"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for cmd in (["--src", "hf", "--dst", "mcore", "--ckpt-format", "torch", "--load", hf_models["qwen2"],
                 "--save", str(mcore)],
                ["--src", "mcore", "--dst", "hf", "--dtype", "bf16", "--load", str(mcore), "--save", str(hf_out)]):
        subprocess.run([sys.executable, "-m", "dist_reshard.launch", *cmd, "--quiet"], env=env, check=True,
                       timeout=120)
    ok = _verify(str(hf_out), "--against", str(mcore))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr[-2000:]
    assert _verify(str(hf_out), "--against", hf_models["qwen2"]).returncode == 0
    assert _verify(str(hf_out), "--against", hf_models["llama3"]).returncode != 0
    assert _verify(str(mcore), "--against", hf_models["qwen2"]).returncode == 0
    rank_file = mcore / "iter_0000001" / "model_optim_rng.pt"
    if not rank_file.exists():
        rank_file = next((mcore / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt"))
    state = torch.load(rank_file, weights_only=False)
    state["args"].rotary_base = 1.0
    torch.save(state, rank_file)
    man = read_manifest(str(mcore))
    for entry in man["files"]:  # a consistent manifest: only the args check can tell
        entry.update(file_digest(os.path.join(mcore, entry["path"])))
    write_manifest(str(mcore), man)
    bad = _verify(str(mcore), "--against", hf_models["qwen2"])
    assert bad.returncode != 0 and "args.rotary_base = 1.0" in bad.stderr, bad.stderr[-2000:]
