r"""Data-parallel fitting on `torch.distributed` (launched by ``torchrun`` or ``accelerate launch``).

Every rank holds the whole model: the frozen base, the ``[D, P]`` task table, the ``[P]`` global
adapter, AdamW's state and tau. Each step, the batch sampler draws the *same* global minibatch
of ``B`` documents on every rank (same seed, same generator) and rank ``r`` of ``W`` keeps the
contiguous slice ``r B / W .. (r + 1) B / W`` of it (``B`` must be a multiple of ``W``). Pyro
scales the slice's likelihood by ``N / (B / W)``, so rank ``r``'s loss is::

    L_r = -log p(theta, Theta | tau) - W (N / B) sum_{n in slice r} log p(doc_n | theta_task(n))

and the mean over ranks, ``(1 / W) sum_r L_r``, is the one-process objective on the global
batch. `all_reduce_gradients` therefore sums the gradients over ranks and divides by ``W``:
every rank then holds the one-process gradient, takes the same AdamW step and keeps the same
parameters. What else crosses ranks:

- the loss and the training NLL of the history (`sum_over_ranks`);
- the Monte-Carlo Fisher of a learned tau (MAP): each rank draws labels for its slice from its
  own stream (`rank_generator`), and the squared per-document gradients and task ids of all
  slices are gathered (`gather_rows`), so every rank accumulates the same statistics and
  computes the same tau (SVI's variational-EM tau reads only the guide's parameters, which are
  identical on every rank);
- evaluation: each rank scores every ``W``-th document of the split and the per-document sums
  are added over ranks (`shard_indices`, `sum_over_ranks`).

Only rank 0 writes results, checkpoints, reports, tracker logs and progress bars (`is_main`).
A collective that fails (a rank killed, or one that does not arrive within
``TrainConfig.distributed_timeout`` seconds) raises `DistributedError`.

With one process (no ``WORLD_SIZE`` above 1 and no initialised process group) every function
here is the identity or a no-op, so the one-process code path is unchanged.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "init_from_env",
    "active",
    "world_size",
    "rank",
    "is_main",
    "local_slice",
    "all_reduce_gradients",
    "sum_over_ranks",
    "gather_rows",
    "rank_generator",
    "shard_indices",
    "barrier",
    "main_first",
]


class DistributedError(RuntimeError):
    """A collective operation failed: another rank stopped or did not arrive in time."""


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """``W``, the number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes files, logs and progress bars (rank 0)."""
    return rank() == 0


def init_from_env(device: torch.device, timeout: float = 1800.0) -> None:
    """Start the process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1`` and none is initialised yet.

    NCCL on CUDA, gloo on the CPU. On CUDA the process's current device becomes
    ``cuda:LOCAL_RANK``. ``timeout`` is how many seconds a rank waits at a collective.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=float(timeout)))


def _failed(what: str, err: BaseException) -> DistributedError:
    return DistributedError(
        f"rank {dist.get_rank()} of {dist.get_world_size()}: the collective {what} failed; another "
        "rank stopped (crashed or was killed) or did not reach it within "
        "TrainConfig.distributed_timeout seconds. Relaunch every rank; with checkpoint_dir set, "
        f"resume=<checkpoint_dir> continues from the last checkpoint. ({type(err).__name__}: "
        f"{' '.join(str(err).split())[:300]})"
    )


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError is a RuntimeError
        raise _failed(what, err) from err


def local_slice(batch_size: int) -> slice:
    """This rank's contiguous part of a global minibatch of ``batch_size`` documents.

    Raises
    ------
    ValueError
        When ``batch_size`` is not a multiple of the world size (the ranks' slices would differ
        in size and their likelihood scales ``N / slice`` would not add up to ``N / B``).
    """
    W = world_size()
    if batch_size % W:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of the {W} ranks; every rank takes an equal "
            f"slice of each minibatch. Use a multiple of {W}, e.g. batch_size={W * max(1, batch_size // W)}."
        )
    part = batch_size // W
    return slice(rank() * part, (rank() + 1) * part)


@torch.no_grad()
def all_reduce_gradients(parameters: Sequence[torch.Tensor]) -> None:
    """Replace each ``p.grad`` by its mean over ranks (one flat all-reduce of every gradient).

    The one place where gradients cross ranks: the global adapter's ``[P]``, the task table's
    ``[D, P]`` (whole, every row) and, under SVI, the log-scales. With each rank's loss the
    Pyro loss of its slice (likelihood scaled by ``N / (B / W)``), the mean is the gradient of
    the one-process objective on the global batch (see the module docstring). A parameter
    without a gradient on this rank is reduced as zeros, so every rank sends the same layout.
    """
    if not active():
        return
    params = list(parameters)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    with _collective("all_reduce of the gradients"):
        dist.all_reduce(flat)
    flat.div_(world_size())
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (same shape on every rank), a new tensor; the tensor
    itself with one process."""
    if not active():
        return tensor
    out = tensor.detach().clone()
    with _collective("all_reduce (sum)"):
        dist.all_reduce(out)
    return out


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor (``[n, ...]``, the same ``n`` on every rank) concatenated over ranks in rank
    order, ``[W n, ...]``; the tensors themselves with one process. With the contiguous slices
    of `local_slice` the rows come back in the global minibatch's order."""
    if not active():
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        with _collective("all_gather"):
            dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """A generator for this rank's own draws: ``generator`` itself with one process; else a
    fresh one seeded by a number drawn from ``generator`` (the same on every rank, so the shared
    generator stays in step and a checkpoint of rank 0's holds every rank's) plus the rank, so
    that the ranks' draws are independent."""
    if not active():
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(generator.device).manual_seed(seed + rank())


def shard_indices(n: int) -> np.ndarray:
    """This rank's share of ``n`` documents to evaluate: every ``W``-th, from the rank on."""
    return np.arange(rank(), n, world_size())


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if active():
        with _collective("barrier"):
            dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (e.g. rank 0 creates and marks a
    folder that the others then find)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
