"""Where rank, world size and the rendezvous address come from: torchrun, SLURM's srun, or MPI.

torchrun exports RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT itself. Under `srun python -m
dist_reshard.launch` they come from SLURM's variables; under `mpirun`/`mpiexec` from MPI (mpi4py), with
rank 0's address and a free port broadcast over MPI. Either way torch.distributed then does the work.
"""

from __future__ import annotations

import os
import socket
import subprocess

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list; `scontrol` expands bracket ranges where it is installed."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = nodelist.split(",")[0]
    if "[" in first:  # node[01-04] -> node01
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def discover() -> str:
    """Fill the torch.distributed environment variables; returns which launcher was found."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST",
                                                                                               "127.0.0.1"))))
        # Every task derives the same port from the job id; MASTER_PORT overrides it.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    if any(v in env for v in _MPI_RANK_VARS):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        addr = comm.bcast((socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None, root=0)
        env["RANK"], env["WORLD_SIZE"] = str(comm.Get_rank()), str(comm.Get_size())
        env["LOCAL_RANK"] = env.get("MPI_LOCALRANKID", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        env.setdefault("MASTER_ADDR", addr[0])
        env.setdefault("MASTER_PORT", str(addr[1]))
        return "mpi"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return "single"
