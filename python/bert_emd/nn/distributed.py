"""``torch.distributed`` helpers of the losses and trainers (all no-ops in one process).

- :func:`distributed_world` -- (rank, world size) of the default process group, or None;
- :func:`world_size` -- the number of processes (1 without a process group);
- :func:`all_reduce_mean` -- a tensor averaged over the processes (a device op, no host sync);
- :func:`average_grad_over_ranks` -- a gradient hook that averages a parameter's gradient over
  the processes (for parameters outside the student's DDP wrapper, such as the projections);
- :func:`broadcast_state` -- every process gets rank 0's ``state_dict`` tensors of a module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["all_reduce_mean", "average_grad_over_ranks", "broadcast_state", "distributed_world", "world_size"]


def distributed_world() -> tuple[int, int] | None:
    """(rank, world size) of the default ``torch.distributed`` process group, or None without one
    (or with a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def world_size() -> int:
    """Processes in the default process group; 1 without one."""
    world = distributed_world()
    return 1 if world is None else world[1]


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average a (detached) tensor over all ranks; a device op, no host synchronisation. Returns
    ``t`` itself in one process, a new tensor otherwise."""
    world = world_size()
    if world == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world


def average_grad_over_ranks(grad: Tensor) -> Tensor:
    """Backward hook (``param.register_hook``): the mean of ``grad`` over the ranks.

    The losses' projections live outside the student's DDP wrapper, so DDP never averages their
    gradients; without this hook each rank would step them with the gradient of its own share of
    the batch and the ranks' copies would drift apart. Idempotent if the user wraps the loss in
    DDP as well (the mean of equal gradients is unchanged)."""
    world = world_size()
    if world == 1:
        return grad
    grad = grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    return grad / world


def broadcast_state(module: nn.Module) -> None:
    """In a distributed run, give every rank rank 0's ``state_dict`` tensors of ``module`` (a loss
    outside the student's DDP wrapper, which only syncs the student)."""
    if distributed_world() is None:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)
