"""Small worlds for tests: a VM with a few frames and a tiny RAM swap device."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.io.engine import IOEngine
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

__all__ = ["PAGE", "REFERENCE_POLICIES", "small_vm"]

PAGE = 4096

#: The reference sources' policies (``small_vm(reference=True)``).
REFERENCE_POLICIES: dict[str, Any] = {
    "cluster_max_npages": 4,
    "readaround_npages": 2,
    "sequential_readahead": False,
    "pageout_batching": False,
    "swap_free_batch_nblocks": 1,
}


def small_vm(
    nframes: int = 8,
    swap_nblocks: int | list[int] = 64,
    *,
    faulty: bool = False,
    engine: IOEngine | None = None,
    layout: str = "per_device",
    reference: bool = False,
    **config: Any,
) -> tuple[VM, list[Any]]:
    """A VM of ``nframes`` frames over RAM swap devices; returns (vm, devices).

    The page daemon thread is off unless ``daemon_thread=True`` is passed, so
    paging happens deterministically in the faulting thread. Every other
    policy is the production default of ``VMConfig``, so the default paths
    are the tested ones; ``reference=True`` follows the reference sources
    instead (FreeBSD 2002, NetBSD 1.48: clusters of 4 pages, read-around of 2,
    ``sequential_readahead`` and ``pageout_batching`` off,
    ``swap_free_batch_nblocks=1``), for tests of those exact behaviours.
    Keyword arguments override single ``VMConfig`` fields either way.
    With ``faulty`` every device is wrapped in a ``FaultyDevice`` (no faults until told).
    """
    sizes = [swap_nblocks] if isinstance(swap_nblocks, int) else swap_nblocks
    devices: list[Any] = []
    for i, n in enumerate(sizes):
        dev: Any = MemoryDevice(n, PAGE, name=f"ram{i}")
        if faulty:
            dev = FaultyDevice(dev, seed=i)
        devices.append(dev)
    base = replace(VMConfig(), daemon_thread=False)
    if reference:
        base = replace(base, **REFERENCE_POLICIES)
    cfg = replace(base, **config)
    vm = VM(memory=nframes * PAGE, swap=devices, config=cfg, engine=engine, layout=layout)
    return vm, devices
