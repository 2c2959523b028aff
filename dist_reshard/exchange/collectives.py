"""Process group set-up and the collectives the conversion uses: error agreement and bucketed all-to-all.

Every exchange is one `all_to_all_single` on a flat byte buffer whose split sizes both sides know from
the plan, so no sizes travel. It covers scatter (a row-parallel run cut into column blocks for the TP
writers), broadcast (a norm read once, sent to every file that holds it) and gather (QKV and SwiGLU
pieces from several readers into one shard). On GPUs the buffers live on the device and go over NCCL.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..base.errors import ConversionError


def init(device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join (or create) the default process group; returns the device exchange buffers live on.

    Rank and rendezvous come from torchrun, srun or mpirun (see launchers.py); a plain
    `python -m dist_reshard.launch` runs as a world of one. A group the caller has initialised already (a
    framework calling the Python API) is used as it is: its backend says where the buffers live.
    """
    from .launchers import discover

    if dist.is_initialized():
        use_cuda = device == "cuda" or (device == "auto" and dist.get_backend() != "gloo")
    else:
        discover()
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and dist.is_initialized():  # the caller's group: its ranks' devices are already chosen
        dev = torch.device("cuda", torch.cuda.current_device())
    elif use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def initialized() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def barrier() -> None:
    dist.barrier()


def agree(error: BaseException | None, device: torch.device, progress: int = 0) -> int:
    """Every rank learns whether any rank failed; all then raise the lowest failing rank's message.

    Called at phase and bucket boundaries, so a rank that hit bad input never leaves its peers waiting
    inside an exchange: they all leave together with the same first line. The same reduction sums each
    rank's `progress` (bytes done), which rank 0's progress bar shows; the sum is returned.
    """
    flag = torch.tensor([0 if error is None else 1, progress], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    if not flag[0].item():
        return int(flag[1].item())
    messages = gather_objects(None if error is None else str(error))
    if isinstance(error, ConversionError):
        agreed = error
    elif error is not None:
        text = str(error).splitlines()[0] if str(error) else ""
        agreed = ConversionError(f"{error.__class__.__name__}: {text}")
        agreed.__cause__ = error
    else:
        first = next(r for r, m in enumerate(messages) if m is not None)
        agreed = ConversionError(f"{messages[first]} (reported by rank {first})")
    agreed.agreed = True  # every rank raises it together: they may leave together (see `shutdown`)
    raise agreed


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank (small metadata only: pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's object, on every rank (small metadata only: pickled)."""
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def exchange_flat(send_buf: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                  device: torch.device) -> torch.Tensor:
    """All-to-all of one flat uint8 CPU buffer, packed in place by the caller: send_splits[d] bytes go to
    rank d, in rank order. Returns the flat CPU receive buffer: recv_splits[s] bytes from each rank s, in
    rank order. Nothing is concatenated or copied on the CPU side; on CUDA the send buffer should be
    pinned (the copy to the device is then asynchronous)."""
    if device.type == "cuda":
        send_buf = send_buf.to(device, non_blocking=send_buf.is_pinned())
    recv_buf = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv_buf, send_buf, [int(x) for x in recv_splits], [int(x) for x in send_splits])
    if device.type == "cuda":
        recv_buf = recv_buf.cpu()
    return recv_buf


def shutdown(error: BaseException | None = None, destroy: bool = True) -> None:
    """Leave together: a rank tearing gloo down while a peer is still inside a collective aborts it. After
    an error this rank alone raised (inside a collective, where no agreement can follow) it leaves at once:
    its peers then see the connection close (and torchrun stops them) rather than wait for --timeout.
    `destroy=False` leaves a group the caller made (the Python API under a framework) initialised."""
    if error is not None and not getattr(error, "agreed", False):
        return
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            if destroy:
                dist.destroy_process_group()
