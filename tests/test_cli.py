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
