"""torchrun SPMD plumbing: process-group set-up from the environment, and the few collectives the loop needs.

One process per device. `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK (and the c10d rendezvous for
multi-node); a plain `python -m erpo_fast.train` is a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erpo_fast.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device: str = "auto") -> Runtime:
    """Join the process group torchrun described (gloo on CPU, NCCL on CUDA) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: a rendezvous port for a launcher started from this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_size() -> int:
    """The default process group's size; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj, runtime: Runtime | None = None) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group). Without ``runtime``: over the
    default process group, whoever set it up (the learner and `erpo_fast.metrics` know it, not a Runtime)."""
    world_size = _world_size() if runtime is None else runtime.world_size
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_floats(values, op: str = "sum") -> list[float]:
    """The sum (``op="max"``: the maximum) of a few floats over every rank of the default process group, in
    float64; the values themselves without one. Runs on the device the backend needs (CPU for gloo, the
    current CUDA device for NCCL). The learner uses it: it knows the process group, not a Runtime."""
    if _world_size() == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj, runtime: Runtime, src: int = 0):
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
