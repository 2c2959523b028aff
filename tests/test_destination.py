"""The source is never touched, two jobs never share a --save, an orphaned rank never publishes.

Each unlucky layout through the real CLI (a world of one, or torchrun where ranks matter), with the
source hashed before and after."""

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, tree_hashes
from dist_reshard.run.destination import DestinationLock, lock_path, publish, replaced_path, staging_path
from dist_reshard.base.errors import ConversionError


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    from dist_reshard.testing.tiny_models import build_model, save_model

    folder = str(tmp_path_factory.mktemp("dest") / "hf")
    save_model(build_model("llama3", seed=3), folder)
    return folder


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _convert(load, save, *extra, wait=True):
    cmd = [sys.executable, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--ckpt-format", "torch",
           "--load", str(load), "--save", str(save), "--quiet", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def _symlinked_parent(tmp, hf):
    _copy(hf, tmp / "real" / "model")
    os.symlink(tmp / "real", tmp / "link")
    return tmp / "real" / "model", tmp / "link" / "model", "is"


def _load_links_to_save(tmp, hf):
    _copy(hf, tmp / "out")
    os.symlink(tmp / "out", tmp / "load")
    return tmp / "load", tmp / "out", "is"


def _load_inside_save(tmp, hf):
    _copy(hf, tmp / "work" / "model")
    return tmp / "work" / "model", tmp / "work", "contains"


def _save_inside_load(tmp, hf):
    _copy(hf, tmp / "model")
    return tmp / "model", tmp / "model" / "converted", "lies inside"


def _shard_symlinked_into_save(tmp, hf):
    """An HF cache: the snapshot's shards are symlinks to blobs; --save is the blobs folder."""
    blobs, snap = tmp / "blobs", tmp / "snapshot"
    _copy(hf, snap)
    blobs.mkdir()
    for name in os.listdir(snap):
        if name.endswith(".safetensors"):
            os.rename(snap / name, blobs / name)
            os.symlink(blobs / name, snap / name)
    return snap, blobs, "contains"


def _save_is_staging_of_load(tmp, hf):
    """--load is what --save's staging folder would be (deleted before a fresh run)."""
    _copy(hf, tmp / ".out.dist_reshard-staging")
    return tmp / ".out.dist_reshard-staging", tmp / "out", "is"


LAYOUTS = [_symlinked_parent, _load_links_to_save, _load_inside_save, _save_inside_load,
           _shard_symlinked_into_save, _save_is_staging_of_load]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f.__name__.strip("_") for f in LAYOUTS])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_source_is_never_touched(hf_src, tmp_path, layout, overwrite):
    load, save, relation = layout(tmp_path, hf_src)
    before = tree_hashes(tmp_path)
    proc = _convert(load, save, *(["--overwrite"] if overwrite else []))
    assert proc.returncode == 1, proc.stderr[-2000:]
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"dist_reshard: error: --save {save}:") and f"which {relation} the source" in first, first
    assert tree_hashes(tmp_path) == before  # nothing written, moved or deleted: not even a lock or staging


def test_two_concurrent_jobs_on_one_save(hf_src, tmp_path):
    """Two jobs started together: one publishes, the other is refused by name; the output is whole."""
    save = tmp_path / "out"
    jobs = [_convert(hf_src, save, wait=False) for _ in range(2)]
    results = [(j.wait(timeout=120), j.stderr.read()) for j in jobs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert ("another dist_reshard job is writing it" in refused or "exists and is not empty" in refused), refused
    verify = subprocess.run([sys.executable, "-m", "dist_reshard.verify", str(save), "--against", hf_src],
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    assert not os.path.exists(lock_path(save)) and not os.path.exists(staging_path(save))
    # A lock held by a live job refuses a second one before it touches anything beside --save.
    lock = DestinationLock(str(tmp_path / "other"))
    lock.acquire()
    try:
        proc = _convert(hf_src, tmp_path / "other")
        assert proc.returncode == 1 and "another dist_reshard job is writing it" in proc.stderr.splitlines()[0]
        assert not os.path.exists(staging_path(tmp_path / "other"))
    finally:
        lock.release()
    # A dead holder's lock is released by the OS: a lock file left behind does not block.
    with open(lock_path(tmp_path / "other"), "w") as f:
        f.write("pid 1")
    assert _convert(hf_src, tmp_path / "other").returncode == 0


def test_publish_rechecks_overwrite(tmp_path):
    """--save filled by someone else while the job ran: without --overwrite it is never replaced."""
    save, staging = tmp_path / "out", tmp_path / ".out.dist_reshard-staging"
    staging.mkdir()
    (staging / "new").write_text("new")
    save.mkdir()
    (save / "theirs").write_text("theirs")
    with pytest.raises(ConversionError, match="exists and is not empty; pass --overwrite"):
        publish(str(save), str(staging), False, str(tmp_path / "src"))
    assert (save / "theirs").read_text() == "theirs" and (staging / "new").exists()
    publish(str(save), str(staging), True, str(tmp_path / "src"))
    assert os.listdir(save) == ["new"]


def test_save_under_a_staging_named_parent_publishes(hf_src, tmp_path):
    parent = tmp_path / "run-staging"
    save = parent / "out"
    assert _convert(hf_src, save).returncode == 0
    proc = _convert(hf_src, save, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert replaced_path(save) == str(parent / ".out.dist_reshard-replaced")
    assert sorted(os.listdir(parent)) == ["out"] and not (tmp_path / "run-replaced").exists()


def test_orphaned_ranks_do_not_publish(hf_src, tmp_path):
    """The torchrun agent is killed while its ranks finish: they end without publishing."""
    save = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
           "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--tp", "2", "--load", hf_src, "--save", str(save),
           "--quiet"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=dict(_env(), DIST_RESHARD_FAULT="*:publish:pause"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    for line in agent.stderr:
        lines.append(line)
        if "pausing at publish" in line:
            break
    agent.kill()  # SIGKILL: the agent cannot stop its workers
    start = time.monotonic()
    rest = agent.stderr.read()  # until every rank holding the pipe has exited
    assert time.monotonic() - start < 30
    assert "torchrun agent" in rest and "is gone; not publishing" in rest, "".join(lines) + rest
    assert not save.exists()
