"""DDP plumbing: launching through torchrun, the process group, reductions across ranks.

One process per GPU (NCCL), or N CPU processes (gloo). `train.processes > 1` makes the training
CLI re-launch itself under `torch.distributed.run`; an outer `torchrun` (WORLD_SIZE set) wins.
Only rank 0 logs to MLflow and writes outputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.common import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where reductions happen: NCCL only reduces CUDA tensors

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()  # one process, no process group


def pick_device(choice: str, ctx: Dist = SINGLE, name: str = "train.device") -> torch.device:
    """auto: this rank's GPU when there is one, else the CPU. `name` is what an error names
    (the param or the CLI flag that chose)."""
    if choice not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"{name} {choice}: valid: cpu, cuda, auto")
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{name} cuda: no CUDA device available (use cpu or auto)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{ctx.local_rank}" if choice == "cuda" else "cpu")


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def relaunch(processes: int, module: str, args: list[str]) -> int:
    """Run `python -m module args` in `processes` processes under torchrun; its exit status."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        module,
        *args,
    ]
    log.info("launching %d DDP processes: %s", processes, " ".join(cmd[1:]))
    return subprocess.run(cmd, check=False).returncode


def init(device_type: str) -> Dist:
    """Join the process group torchrun set up (a no-op for a single process)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    local = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise PipelineError(
                f"DDP rank with LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) "
                "visible: set train.processes to at most the number of GPUs"
            )
        # bind this process to its GPU, so pinned memory, barriers and syncs use it, not GPU 0
        torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    elif not dist.is_initialized():
        dist.init_process_group("gloo")
    where = f"cuda:{local}" if device_type == "cuda" else "cpu"
    return Dist(dist.get_rank(), dist.get_world_size(), local, where)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_array(array: np.ndarray, ctx: Dist) -> np.ndarray:
    """Element-wise sum over ranks (confusion matrices, score histograms, loss sums)."""
    if not ctx.active:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy().astype(array.dtype)


def mean_values(values: torch.Tensor, ctx: Dist) -> list[float]:
    """The mean over ranks of a few scalars, so every rank takes the same decision on them."""
    t = values.detach().float().reshape(-1)
    if ctx.active:
        t = t.to(ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / ctx.world
    return t.tolist()


def broadcast_object(obj, ctx: Dist):
    """Rank 0's `obj` on every rank (e.g. the resume state: ranks need not share a disk)."""
    if not ctx.active:
        return obj
    box = [obj if ctx.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Dist) -> None:
    if ctx.active:
        dist.barrier()


def sync_buffers(model: torch.nn.Module, ctx: Dist) -> None:
    """Give every rank rank 0's BatchNorm running statistics (each rank updated its own during
    the epoch), so the sharded evaluation scores one and the same model."""
    if ctx.active:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)
