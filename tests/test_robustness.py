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
    assert errors and all("No space left on device" in e or "write failed" in e for e in errors), proc.stderr[-2000:]
    assert os.listdir(tiny_fs) == [], "staging or partial output left behind"
    assert tree_hashes(load) == before


def test_read_only_destination_is_a_clean_error(hf_models, read_only_fs):
    proc, _ = _run(hf_models["llama3"], read_only_fs / "out")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2 and all("cannot create staging folder" in e for e in errors), proc.stderr[-2000:]
