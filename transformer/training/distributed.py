"""DistributedDataParallel plumbing: detect a ``torchrun`` launch, pick the backend, reduce numbers.

One machine, N processes (CPU: gloo; GPUs: nccl, one GPU per process)::

    torchrun --nproc-per-node 4 -m transformer train configs/bible_en_de.yaml
    python -m torch.distributed.run --nproc-per-node 4 -m transformer train configs/bible_en_de.yaml

Several machines: run the same command on every node, with the node's rank and a reachable rendezvous
address (the first node's host name and a free port)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint node0.example.com:29500 -m transformer train cfg.yaml
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint node0.example.com:29500 -m transformer train cfg.yaml

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` reads them. Every process
reads the same data and the batch sampler shards the batches (``rank`` / ``world_size``); the global
batch is ``world_size * update_freq`` batches per update. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed as dist

from transformer.errors import TransformerError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (as set by torchrun); defaults to a single process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise TransformerError(f"environment variables RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    return DistInfo(rank, world, local)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; under DDP on CUDA each process takes ``cuda:LOCAL_RANK``.

    Raises:
        TransformerError: CUDA asked for (``train.device``) but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TransformerError(f"config field train.device: {name!r} but CUDA is not available; use cpu or auto")
        if info.enabled and name == "cuda":
            if info.local_rank >= torch.cuda.device_count():
                raise TransformerError(
                    f"config field train.device: {name!r} gives each process the GPU of its LOCAL_RANK, but process "
                    f"{info.local_rank} sees {torch.cuda.device_count()} CUDA device(s); launch at most that many "
                    "processes a node (torchrun --nproc-per-node), or set train.device=cpu")
            name = f"cuda:{info.local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise TransformerError(f"config field train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    Returns:
        (this process's :class:`DistInfo`, its device).
    """
    info = env_info()
    device = resolve_device(device_name, info)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def cleanup() -> None:
    """Destroy the process group if this module (or anyone) created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all processes (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: Union[str, torch.device] = "cpu") -> list[float]:
    """Sum a few numbers across processes (float64); returned unchanged when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_flag(flag: bool, device: Union[str, torch.device] = "cpu") -> bool:
    """True on every process if it is True on any (e.g. "stop now"); unchanged when not distributed."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


__all__ = ["DistInfo", "env_info", "resolve_device", "setup", "cleanup", "barrier", "all_reduce_sum", "broadcast_flag"]
