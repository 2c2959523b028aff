"""The data path's shortcuts keep their promises: legacy files hashed while written match a re-read,
the background writers keep the first failure and end every rank with it, reads fill every byte, and
one rank (everything a transfer to itself, files written side by side) gives the same bytes as two."""

import argparse
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, torchrun, tree_hashes
from dist_reshard.formats import manifest
from dist_reshard.run.data_loop import _BackgroundWriter, _units_due
from dist_reshard.base.errors import ConversionError
from dist_reshard.plan.data import ReadItem
from dist_reshard.read.reader import RangeReader
from dist_reshard.writers import legacy

CONVERT = ["-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--tp", "2", "--pp", "2"]


def test_legacy_digest_while_writing_matches_the_file(tmp_path):
    state = {"model": {"decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(64, 32).bfloat16(),
                       "embedding.word_embeddings.weight": torch.randn(10, 32)}}
    args = argparse.Namespace(iteration=1)
    digest: dict = {}
    size = legacy.write_file(str(tmp_path / "a" / "model_optim_rng.pt"), state, args, digest=digest)
    assert digest == manifest.file_digest(str(tmp_path / "a" / "model_optim_rng.pt")) and digest["size"] == size
    # The same bytes torch.save writes to a plain file object.
    with open(tmp_path / "plain.pt", "wb") as f:
        legacy_state = {"args": args, "checkpoint_version": legacy.CHECKPOINT_VERSION, "iteration": 1,
                        "model": dict(sorted(state["model"].items()))}
        legacy_state["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
        torch.save(legacy_state, f)
    assert (tmp_path / "plain.pt").read_bytes() == (tmp_path / "a" / "model_optim_rng.pt").read_bytes()
    entry = manifest.record_done(str(tmp_path), "a/model_optim_rng.pt", "job", digest=digest)
    assert entry == manifest.record_done(str(tmp_path), "a/model_optim_rng.pt", "job")


def test_reader_fills_every_byte_and_counts(tmp_path):
    data = os.urandom(1 << 16)
    (tmp_path / "f").write_bytes(data)
    reader = RangeReader()
    got = reader.read(ReadItem(0, "t", str(tmp_path / "f"), (0, 1), 100, 5000, 0))
    assert bytes(got.numpy()) == data[100:5100] and reader.bytes_read == 5000
    assert reader.read(ReadItem(0, "t", str(tmp_path / "f"), (0, 1), 7, 0, 0)).numel() == 0
    with pytest.raises(ConversionError, match="unexpected end of file"):
        reader.read(ReadItem(0, "t", str(tmp_path / "f"), (0, 1), (1 << 16) - 10, 20, 0))
    assert reader.bytes_read == 5000
    reader.close()


def test_background_writer_keeps_the_first_failure_and_skips_the_rest():
    done, gate = [], threading.Event()

    def write(i):
        gate.wait(10)
        if i == 1:
            raise OSError(28, "No space left on device")
        done.append(i)

    writer = _BackgroundWriter(write, threads=1)
    for i in range(4):
        writer.submit(i)
    gate.set()
    writer.join()
    assert done == [0] and isinstance(writer.error, OSError) and writer.busy_s >= 0


def test_units_are_due_after_their_last_bucket():
    class T:
        def __init__(self, index, unit):
            self.index, self.unit = index, unit

    class U:
        def __init__(self, index):
            self.index = index

    class Tr:
        def __init__(self, target):
            self.target = target

    class View:
        targets = [T(0, 0), T(1, 1), T(2, 2)]
        units = [U(0), U(1), U(2)]
        recvs = [{0: [Tr(0), Tr(1)]}, {1: [Tr(1)]}]  # unit 2 is all padding

    due = _units_due(View())
    assert {b: [u.index for u in us] for b, us in due.items()} == {0: [0], 1: [1], -1: [2]}


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_one_rank_small_buckets_equals_two_ranks(hf_models, tmp_path, fmt):
    load = hf_models["qwen3"]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, *CONVERT, "--load", load, "--save", str(one), "--ckpt-format", fmt, "--bucket-mb", "1",
             "--quiet", "--report", str(tmp_path / "report.json"), timeout=120)
    with open(tmp_path / "report.json") as f:
        rank = json.load(f)["ranks"][0]
    # One rank is every item's only destination: its bytes are copied file to file, except, in TP2 rank
    # files, the tiny model's row-parallel row blocks (128 bytes: below pass_through.MIN_ROW_BLOCK_BYTES).
    # torch_dist writes these small tensors whole (--whole-chunk-mb), so there every byte passes through.
    in_place = rank["bytes_read_in_place"]
    assert (0 < in_place < rank["bytes_read"]) if fmt == "torch" else in_place == rank["bytes_read"]
    torchrun(2, *CONVERT, "--load", load, "--save", str(two), "--ckpt-format", fmt, "--quiet", timeout=120)
    if fmt == "torch":  # the same rank files, byte for byte (the manifest names the command)
        a, b = tree_hashes(one), tree_hashes(two)
        a.pop("dist_reshard.json", None), b.pop("dist_reshard.json", None)
        assert a == b
    else:  # DCP files are per writing rank: the same tensors, bit for bit
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, "-m", "dist_reshard.inspect", "compare", str(one), str(two)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for out in (one, two):
        verify = subprocess.run([sys.executable, "-m", "dist_reshard.verify", str(out), "--against", load],
                                env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
        assert verify.returncode == 0, verify.stderr[-2000:]


def test_failed_background_write_ends_every_rank(hf_models, tmp_path):
    save = tmp_path / "out"
    env = dict(os.environ, DIST_RESHARD_FAULT="1:write:raise")
    old = os.environ.copy()
    os.environ.update(env)
    try:
        proc = torchrun(2, *CONVERT, "--load", hf_models["llama3"], "--save", str(save), "--ckpt-format", "torch",
                        "--bucket-mb", "1", check=False, timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2 and all("write failed" in e and "injected fault at write" in e for e in errors), \
        proc.stderr[-2000:]
    assert not save.exists() and not (tmp_path / ".out.dist_reshard-staging").exists()
