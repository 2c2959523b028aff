"""Each way of starting ranks, run for real on this machine, gives the same output bytes:
torchrun, srun (SLURM's variables, set here by the test), and mpirun through mpi4py (the mpich wheel)."""

import glob
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, torchrun, tree_hashes

ARGS = ["--src", "hf", "--dst", "mcore", "--tp", "2", "--pp", "2", "--ckpt-format", "torch", "--quiet"]




def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_output(hf_models, tmp_path_factory):
    save = tmp_path_factory.mktemp("launch") / "torchrun"
    torchrun(2, "-m", "dist_reshard.launch", *ARGS, "--load", hf_models["qwen2"], "--save", str(save))
    return save


def test_srun_style_environment(hf_models, tmp_path, torchrun_output):
    save = tmp_path / "srun"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(_env(), SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_reshard.launch", *ARGS, "--load",
                                       hf_models["qwen2"], "--save", str(save)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    assert tree_hashes(save) == tree_hashes(torchrun_output)


def test_mpirun_through_mpi4py(hf_models, tmp_path, torchrun_output):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (install the mpich wheel)")
    save = tmp_path / "mpi"
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "dist_reshard.launch", *ARGS, "--load",
                           hf_models["qwen2"], "--save", str(save)], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_hashes(save) == tree_hashes(torchrun_output)


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sbatch"))),
                         ids=os.path.basename)
def test_slurm_templates_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_slurm_templates_document_their_variables():
    for script in glob.glob(os.path.join(ROOT, "slurm", "*.sbatch")):
        head = open(script).read().split("#SBATCH", 1)[0]
        for var in ("HF_DIR", "OUT_DIR", "TP", "PP", "FORMAT", "VENV"):
            assert var in head, (script, var)
