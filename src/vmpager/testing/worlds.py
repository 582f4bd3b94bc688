"""Small worlds for tests: a VM with a few frames and a tiny RAM swap device."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.io.engine import IOEngine
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

__all__ = ["small_vm"]

PAGE = 4096


def small_vm(
    nframes: int = 8,
    swap_nblocks: int | list[int] = 64,
    *,
    faulty: bool = False,
    engine: IOEngine | None = None,
    layout: str = "per_device",
    **config: Any,
) -> tuple[VM, list[Any]]:
    """A VM of ``nframes`` frames over RAM swap devices; returns (vm, devices).

    The page daemon thread is off unless ``daemon_thread=True`` is passed, so
    paging happens deterministically in the faulting thread; read-around,
    pageout clusters and swap frees follow the reference sources (FreeBSD
    2002, NetBSD 1.48: ``sequential_readahead`` and ``pageout_batching`` off,
    ``swap_free_batch_nblocks=1``) unless asked.
    With ``faulty`` every device is wrapped in a ``FaultyDevice`` (no faults until told).
    """
    sizes = [swap_nblocks] if isinstance(swap_nblocks, int) else swap_nblocks
    devices: list[Any] = []
    for i, n in enumerate(sizes):
        dev: Any = MemoryDevice(n, PAGE, name=f"ram{i}")
        if faulty:
            dev = FaultyDevice(dev, seed=i)
        devices.append(dev)
    # The reference sources' policies unless a test asks for the throughput ones.
    base = replace(
        VMConfig(),
        daemon_thread=False,
        cluster_max_npages=4,
        readaround_npages=2,
        sequential_readahead=False,
        pageout_batching=False,
        swap_free_batch_nblocks=1,
    )
    cfg = replace(base, **config)
    vm = VM(memory=nframes * PAGE, swap=devices, config=cfg, engine=engine, layout=layout)
    return vm, devices
