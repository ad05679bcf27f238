"""Scale-out for `lldif train` under `torchrun`: process group, the process's device, batch statistics shared
across processes, and reductions of metrics. One process without torchrun is the same code with world size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn

from .run import choose_device


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0


def start(device: str | None = None) -> Processes:
    """Joins the process group when started by torchrun (NCCL on CUDA, gloo on CPU) and picks this process's
    device: `device` ("cpu" or "cuda"; default cuda when available), on CUDA the local rank's GPU."""
    kind = choose_device(device).type
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(torch.device(kind))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Processes(chosen, dist.get_rank(), dist.get_world_size())


def stop(processes: Processes) -> None:
    """Leaves the process group (if this run joined one)."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(values: torch.Tensor, processes: Processes) -> torch.Tensor:
    """The element-wise sum of `values` over all processes (no gradient)."""
    if processes.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


class _SharedStatistics:
    """The forward of a BatchNorm whose training statistics cover the batch shares of all processes, so N processes
    normalise exactly as one process with the whole batch. PyTorch's SyncBatchNorm does this on GPUs only; this
    works with any process group (gloo on CPU) through differentiable all-reduces of the per-channel sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        count = x.new_full((1,), x.numel() // channels)
        sums = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count])
        sums = dist_functional.all_reduce(sums)
        total = sums[-1]
        mean = sums[:channels] / total
        variance = (sums[channels:2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = variance * (total / (total - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class SharedBatchNorm1d(_SharedStatistics, nn.BatchNorm1d):
    """BatchNorm1d with statistics over all processes (see `_SharedStatistics`)."""


class SharedBatchNorm2d(_SharedStatistics, nn.BatchNorm2d):
    """BatchNorm2d with statistics over all processes (see `_SharedStatistics`)."""


SHARED_BATCH_NORMS = {nn.BatchNorm1d: SharedBatchNorm1d, nn.BatchNorm2d: SharedBatchNorm2d}


def share_batch_norms(model: nn.Module, processes: Processes) -> nn.Module:
    """Replaces the model's BatchNorm1d/2d layers by ones with statistics over all processes (PyTorch's
    SyncBatchNorm on CUDA, SharedBatchNorm1d/2d on CPU), keeping their parameters, buffers and frozen state."""
    if not processes.distributed:
        return model
    if processes.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) in SHARED_BATCH_NORMS:
            shared = SHARED_BATCH_NORMS[type(child)](child.num_features, child.eps, child.momentum, child.affine,
                                                     child.track_running_stats)
            shared.load_state_dict(child.state_dict())
            shared.train(child.training)
            shared.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(model, name, shared)
        else:
            share_batch_norms(child, processes)
    return model
