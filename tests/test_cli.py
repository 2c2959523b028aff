"""The launcher's own behaviour: dry runs, the report file, a world of one without torchrun."""

import json
import os
import subprocess
import sys

from conftest import ROOT, torchrun


def test_dry_run_plans_without_touching_data(hf_models, tmp_path):
    save, report = tmp_path / "out", tmp_path / "report.json"
    torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["qwen3"],
             "--save", str(save), "--tp", "2", "--pp", "2", "--dry-run", "--report", str(report))
    assert not save.exists()
    job = json.loads(report.read_text())
    assert job["dry_run"] and job["world_size"] == 2
    assert all(r["bytes_read"] == 0 for r in job["ranks"])
    assert sum(r["planned"]["bytes_read"] for r in job["ranks"]) == job["source_bytes"]


def test_single_process_without_torchrun(hf_models, tmp_path):
    save = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load",
                           hf_models["llama2"], "--save", str(save), "--tp", "2", "--ckpt-format", "torch"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bytes read / source bytes = 1.0000" in proc.stdout
    assert sorted(os.listdir(save / "iter_0000001")) == ["mp_rank_00", "mp_rank_01"]


def test_progress_bar_on_rank_zero_only(hf_models, tmp_path):
    proc = torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["qwen3"],
                    "--save", str(tmp_path / "out"), "--tp", "2", "--progress", "on", "--bucket-mb", "1")
    bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("dist_reshard:")]
    assert bars and "100%" in bars[-1] and "B/s" in bars[-1], proc.stderr[-2000:]
    quiet = torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["qwen3"],
                     "--save", str(tmp_path / "out2"), "--tp", "2", "--quiet")
    assert "dist_reshard:" not in quiet.stderr and quiet.stdout == ""
