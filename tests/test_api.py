"""The Python API (`dist_reshard.convert`): single-process, and under a process group the caller made; the same
bytes as the command line, errors raised (not exited), the caller's group left working."""

import json
import os
import subprocess
import sys

from conftest import ROOT, assert_same_hf, torchrun, tree_hashes


def _without_launcher_env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _files(folder) -> dict:
    """Every output file's hash; the manifest's list of files (its command line and world size differ by run)."""
    hashes = tree_hashes(folder)
    manifest = hashes.pop("dist_reshard.json")
    return dict(hashes, listed=manifest["files"])


def test_convert_in_one_process_writes_what_the_torchrun_job_writes(hf_models, tmp_path):
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    script = ("import json, os, sys, dist_reshard\n"
              "job = dist_reshard.convert(src='hf', dst='mcore', load=sys.argv[1], save=sys.argv[2], tp=2, pp=2,\n"
              "                           ckpt_format='torch', transformer_impl='local', report=sys.argv[3])\n"
              "print(json.dumps(dict(world=job['world_size'], read=job['bytes_read_total'], src=job['source_bytes'])))\n")
    proc = subprocess.run([sys.executable, "-c", script, hf_models["qwen3"], str(api_out), str(tmp_path / "r.json")],
                          env=_without_launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout.strip().splitlines()[-1])
    assert job["world"] == 1 and job["read"] == job["src"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["world_size"] == 1
    manifest = json.loads((api_out / "dist_reshard.json").read_text())
    assert manifest["command"][0] == "dist_reshard.convert" and "tp=2" in manifest["command"]
    torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["qwen3"],
             "--save", str(cli_out), "--tp", "2", "--pp", "2", "--ckpt-format", "torch", "--transformer-impl", "local")
    assert _files(api_out) == _files(cli_out)


def test_convert_under_the_callers_process_group(hf_models, tmp_path):
    out = tmp_path / "jobs"
    out.mkdir()
    torchrun(2, "tests/workers/api_in_group.py", hf_models["qwen3"], str(out))
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for s in seen:
        assert s["there"]["world_size"] == 2 and s["back_world_size"] == 2
        assert s["there"]["read"] == s["there"]["source"]
        assert s["initialized_after_job"], "a group the caller made is left initialised"
        assert s["error"] and "config.json" in s["error"], s["error"]
        assert not s["bad_save_exists"]
        assert s["all_reduce"] == 3
    assert seen[0]["error"] == seen[1]["error"]  # one agreed message on every rank
    assert_same_hf(hf_models["qwen3"], str(out / "back"))
    # The same bytes as the command line's job at the same N.
    cli = tmp_path / "cli"
    torchrun(2, "-m", "dist_reshard.launch", "--src", "hf", "--dst", "mcore", "--load", hf_models["qwen3"],
             "--save", str(cli), "--tp", "2", "--transformer-impl", "local")
    assert _files(out / "mcore") == _files(cli)
