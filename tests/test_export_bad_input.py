"""Bad Megatron sources through the real CLI: a clear first line naming the culprit on every rank,
a non-zero exit within seconds, and nothing at --save."""

import glob
import os
import shutil
import time

import pytest
import torch

from conftest import torchrun


@pytest.fixture(scope="module")
def legacy_source(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = str(root / "mcore")
    torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["llama3"],
             "--save", out, "--tp", "2", "--pp", "2", "--ckpt-format", "torch", "--quiet")
    return out


def _rank_files(folder):
    return sorted(glob.glob(os.path.join(folder, "iter_0000001", "mp_rank_*", "model_optim_rng.pt")))


def _edit_all(folder, edit):
    for f in _rank_files(folder):
        sd = torch.load(f, weights_only=False)
        edit(sd)
        torch.save(sd, f)


def _missing_rank(folder):
    f = _rank_files(folder)[-1]
    shutil.rmtree(os.path.dirname(f))
    return f"{os.path.basename(os.path.dirname(f))}/model_optim_rng.pt: rank file missing"


def _mixed_iterations(folder):
    f = _rank_files(folder)[1]
    sd = torch.load(f, weights_only=False)
    sd["iteration"] = 7
    torch.save(sd, f)
    return "(mixed iterations)"


def _args_contradict_shapes(folder):
    def edit(sd):
        sd["args"].ffn_hidden_size = 64  # the tensors were written for 128
    _edit_all(folder, edit)
    return "but the checkpoint's args imply"


def _unknown_model(folder):
    def edit(sd):
        sd["args"].hf_architecture = "GPT2LMHeadModel"
    _edit_all(folder, edit)
    return "unsupported architecture 'GPT2LMHeadModel'"


def _old_version(folder):
    def edit(sd):
        sd["checkpoint_version"] = 2.0
    _edit_all(folder, edit)
    return "checkpoint_version 2.0 is below 3.0"


CASES = {"missing_rank_file": _missing_rank, "mixed_iterations": _mixed_iterations,
         "args_contradict_shapes": _args_contradict_shapes, "unknown_model_type": _unknown_model,
         "old_checkpoint_version": _old_version}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dst", ["hf", "mcore"])
def test_bad_megatron_source(legacy_source, tmp_path, case, dst):
    src = str(tmp_path / "src")
    shutil.copytree(legacy_source, src)
    expected = CASES[case](src)
    save = tmp_path / "out"
    start = time.monotonic()
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "mcore", "--dst", dst, "--load", src,
                    "--save", str(save), timeout=120, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "dist_reshard: error:" in line]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert all(expected in e for e in errors), (expected, errors)
    assert time.monotonic() - start < 60
    assert not save.exists()
