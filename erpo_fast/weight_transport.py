"""Weights from the learner to the async rollout process, in memory: a ring of K weight slots.

With ``trainer.async_steps = K`` the rollout process samples batch t+K from version t (the weights after t
updates) while the learner trains on; version v goes to slot ``v % K``. The learner writes version v only once
the rollout process has copied version v-K out of that slot into its engine (`AsyncRollout` waits for that
acknowledgement), so no slot is overwritten while it is read, and with K slots that wait is near zero: version
v-K is read as soon as batch v is sampled, and the learner needs batch v before it can make version v.

Each slot is one flat buffer with a view per parameter, in the engine's dtype, on the rollout side's device:
on CPU in shared memory (``share_memory_``: one file descriptor per slot, no disk round-trip); on CUDA a
device buffer the rollout process maps through CUDA IPC (torch.multiprocessing shares CUDA tensors that way), so
the learner's copy into it is a device-to-device copy. The buffers travel to the rollout process once, at spawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor

from erpo_fast.errors import ConfigError

_ALIGN = 64  # bytes: every view starts on a cache line and satisfies any dtype's alignment


class WeightSlots:
    """``num_slots`` copies of named tensors (``layout``: name -> shape) in one dtype on one device."""

    def __init__(self, layout: dict[str, tuple[int, ...]], *, num_slots: int, dtype: torch.dtype,
                 device: torch.device):
        if num_slots < 1:
            raise ValueError(f"WeightSlots: num_slots must be >= 1, got {num_slots}")
        self.layout = {name: tuple(shape) for name, shape in layout.items()}
        self.dtype, self.device = dtype, torch.device(device)
        item = torch.empty((), dtype=dtype).element_size()
        self._offsets: dict[str, int] = {}
        nbytes = 0
        for name, shape in self.layout.items():
            self._offsets[name] = nbytes
            size = item * _numel(shape)
            nbytes += -(-size // _ALIGN) * _ALIGN
        self.nbytes = nbytes  # per slot
        if self.device.type == "cpu":
            _check_shared_memory(num_slots * nbytes)
        self.buffers = [torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device) for _ in range(num_slots)]
        if self.device.type == "cpu":
            for b in self.buffers:
                b.share_memory_()

    @classmethod
    def like(cls, named: Iterable[tuple[str, Tensor]], **kwargs) -> WeightSlots:
        return cls({name: tuple(t.shape) for name, t in named}, **kwargs)

    @property
    def num_slots(self) -> int:
        return len(self.buffers)

    def views(self, version: int) -> dict[str, Tensor]:
        """Version ``version``'s slot as name -> tensor (views into the shared buffer, not copies)."""
        buf = self.buffers[version % self.num_slots]
        item = torch.empty((), dtype=self.dtype).element_size()
        return {name: buf[off:off + item * _numel(self.layout[name])].view(self.dtype).view(self.layout[name])
                for name, off in self._offsets.items()}

    def write(self, version: int, named: Iterable[tuple[str, Tensor]]) -> int:
        """Copy ``named`` (every name of the layout, once) into version's slot; returns the bytes written."""
        views = self.views(version)
        seen = set()
        for name, t in named:
            if name not in views:
                raise KeyError(f"weight {name!r} is not in the slots' layout")
            views[name].copy_(t.detach())
            seen.add(name)
        missing = set(views) - seen
        if missing:
            raise KeyError(f"weights missing from the update: {', '.join(sorted(missing)[:5])}")
        return self.nbytes

    def __getstate__(self) -> dict:
        return {"layout": self.layout, "dtype": self.dtype, "device": self.device, "offsets": self._offsets,
                "nbytes": self.nbytes, "buffers": self.buffers}

    def __setstate__(self, state: dict) -> None:
        self.layout, self.dtype, self.device = state["layout"], state["dtype"], state["device"]
        self._offsets, self.nbytes, self.buffers = state["offsets"], state["nbytes"], state["buffers"]


def _check_shared_memory(needed: int, path: str = "/dev/shm") -> None:
    """A clear error instead of a bus error when /dev/shm (Docker's default: 64 MB) cannot hold the slots."""
    if not os.path.isdir(path):
        return
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise ConfigError(f"trainer.async_steps needs {needed / 1e9:.2f} GB of shared memory for its weight slots "
                          f"and {path} has {free / 1e9:.2f} GB free: enlarge it (Docker: --shm-size), lower "
                          "trainer.async_steps, or use model.dtype bfloat16 (half the bytes)")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
