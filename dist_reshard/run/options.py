"""What one job is asked to do (`Options`) and what each rank reports back (`RankReport`)."""

from __future__ import annotations

from dataclasses import dataclass, field


from ..config.layout import TargetLayout
from ..plan.data import DEFAULT_BUCKET_BYTES


ITERATION_DIR = "iter_0000001"


@dataclass
class Options:
    load: str
    save: str
    layout: TargetLayout
    overwrite: bool = False
    dry_run: bool = False
    device: str = "auto"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    report: str | None = None
    resume: bool = False
    timeout_s: float = 1800.0
    command: list | None = None
    progress: str = "auto"  # "auto" (a bar when rank 0's stderr is a terminal), "on", "off"
    src: str = "hf"  # "hf" (safetensors folder) or "mcore" (a Megatron-Core checkpoint)
    hf_config: str | None = None  # --dst hf: reference HF folder for config and tokenizer files
    vocab_size: int | None = None  # --src mcore: the true (unpadded) vocabulary, when the args lack it
    drop_mtp: bool = False  # leave out multi-token-prediction layers (model.layers.{L + k}.*)
    layer_pattern: str | None = None  # --dst mcore: a GPT model laid out as a MambaModel pattern, or "gpt" back
    # A check of the exchange: every byte, a rank's own included, goes through the collective (at N=1 on one
    # GPU: NCCL and device buffers), none is copied locally or file to file. Same output, slower.
    loopback: bool = False


@dataclass
class RankReport:
    rank: int
    bytes_read: int = 0
    bytes_read_in_place: int = 0  # of bytes_read: never in a read buffer (copied file to file by the writers)
    bytes_planned: int = 0
    bytes_written: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0  # torch's allocator peak on the rank's GPU (NCCL's own buffers not counted)
    mtp_compared_bytes: int = 0  # read to compare an HF MTP layer's copies with the main tensors (mtp_copies)
    phases: dict = field(default_factory=dict)


def dcp_files(world: int) -> list[str]:
    names = [f"__{r}_0.distcp" for r in range(world)] + [".metadata", "common.pt", "metadata.json"]
    return [f"{ITERATION_DIR}/{n}" for n in names]
