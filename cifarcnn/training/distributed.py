"""Scale-out on PyTorch's standard engine: DistributedDataParallel in processes started by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; one process per GPU (nccl), or per
CPU process (gloo). With no torchrun (or a world of one) everything here is a no-op, so the trainer has one
code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..base.device import select_device
from ..base.errors import ConfigError, UsageError


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (elastic restarts, `--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass
class Dist:
    """This process's place in the job and the few collectives the trainer needs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, *tensors: torch.Tensor) -> None:
        """In place, every rank's values summed over all ranks."""
        if self.active:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def any(self, *flags: bool) -> list[bool]:
        """For each flag, whether it is set on any rank (one collective for all of them)."""
        if not self.active:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (a list of one without torchrun)."""
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def share_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), so all evaluate the model rank 0
        saves."""
        if self.active:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """The model to train: DistributedDataParallel (after converting BatchNorm to SyncBatchNorm when
        asked) under torchrun, the model itself otherwise. The parameters are shared with `model` either way.
        """
        if not self.active:
            return model
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None, sync_batchnorm: bool = False) -> tuple[Dist, torch.device]:
    """Join the torchrun job (nccl on CUDA, gloo on CPU) and pick this rank's device; without torchrun, just
    pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        chosen = select_device(device)
        return Dist(device=chosen), chosen
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # one GPU per process on each node
    elif device is None:
        device = "cpu"
    chosen = select_device(device)
    if chosen.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: torchrun training runs on CUDA (nccl) or the CPU (gloo)")
    if sync_batchnorm and chosen.type != "cuda":
        raise ConfigError("config key 'sync_batchnorm' needs CUDA: PyTorch's SyncBatchNorm does not run on "
                          "the CPU")
    # torchrun's rendezvous store outlives an elastic restart; a prefix per attempt keeps the restarted
    # processes from reading the dead ones' connection details.
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"cifarcnn/attempt_{restart_count()}", store)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=chosen)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return Dist(rank=rank, world_size=world_size, device=chosen), chosen
