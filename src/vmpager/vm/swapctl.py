"""Swap devices while the VM runs: open at start, swapon, swapoff and drain (swapctl).

``SwapControl`` owns the devices the VM opened itself (files it created, the
private default swap file, URL devices) and closes them; devices passed in as
``BlockDevice`` objects stay the caller's. Every method but ``close_devices``
runs with the kernel's lock held.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

from vmpager.devices.by_url import open_swap_url
from vmpager.devices.file import FileDevice
from vmpager.devices.protocol import BlockDevice
from vmpager.devices.url import is_swap_url
from vmpager.errors import SwapExhausted
from vmpager.units import check_int, parse_size
from vmpager.vm.fault import hold_page
from vmpager.vm.kernel import Kernel

__all__ = ["SwapControl", "SwapSpec"]

log = logging.getLogger("vmpager")

_DEFAULT_SWAP_MAX_BYTES = 64 << 30

SwapSpec = str | BlockDevice | tuple[str, int | str]


class SwapControl:
    """The swap devices of one VM; see the module docstring."""

    def __init__(self, kernel: Kernel, replicas: int | None, *, remove_created: bool) -> None:
        self._kernel = kernel
        self.page_size = kernel.page_size
        self.space = kernel.space
        self.swap_pager = kernel.swap_pager
        self._owned_devices: list[BlockDevice] = []
        #: Remove the swap files this VM creates when their device closes.
        self._remove_created = remove_created
        self._remove_on_close: dict[int, str] = {}
        self._swap_replicas = (
            None if replicas is None else check_int(replicas, "replicas", minimum=0, maximum=16)
        )

    def open_initial(self, swap: Sequence[SwapSpec] | None) -> None:
        """The devices the VM starts with (see ``VM``); closes them all on failure."""
        try:
            self._open_swap(swap)
        except BaseException:
            self.close_devices()
            raise

    def _open_swap(self, swap: Sequence[SwapSpec] | None) -> None:
        if swap is None:
            directory = tempfile.gettempdir()
            size = min(_DEFAULT_SWAP_MAX_BYTES, int(shutil.disk_usage(directory).free * 0.9))
            nblocks = size // self.page_size
            if nblocks < 16:
                raise SwapExhausted(f"no room for a swap file in {directory}")
            # Unlinked at once: private, and gone with the VM even after a crash.
            device = FileDevice.temporary(nblocks, block_size=self.page_size, directory=directory)
            self._owned_devices.append(device)
            self.space.swapon(device)
            return
        if isinstance(swap, (str, bytes)):
            raise TypeError("swap must be a list of devices, e.g. ['/var/tmp/swap0:4G']")
        for spec in swap:
            self._add_swap(spec)

    def _add_swap(self, spec: SwapSpec) -> BlockDevice:
        if isinstance(spec, tuple):
            path, size = spec
            if is_swap_url(path):
                raise ValueError(f"a swap URL gives its size as '?size=...', not apart: {spec!r}")
            device: BlockDevice = self._open_file_device(path, size)
        elif isinstance(spec, str) and is_swap_url(spec):
            device = open_swap_url(spec, self.page_size, replicas=self._swap_replicas)
            self._owned_devices.append(device)
        elif isinstance(spec, str):
            path, sep, size_text = spec.rpartition(":")
            if sep and path and size_text and (size_text[0].isdigit() or size_text[0] in "+-."):
                device = self._open_file_device(path, size_text)
            else:
                device = self._open_file_device(spec, None)
        elif isinstance(spec, BlockDevice):
            device = spec
            if device.block_size != self.page_size:
                raise ValueError(
                    f"swap device {device.name}: block_size {device.block_size} "
                    f"!= page_size {self.page_size}"
                )
        else:
            raise TypeError(
                "swap entries must be 'path:size', (path, size), a URL or BlockDevice, "
                f"got {spec!r}"
            )
        self.space.swapon(device)
        return device

    def _open_file_device(self, path: str, size: int | str | None) -> BlockDevice:
        nblocks = None
        if size is not None:
            nblocks = (
                parse_size(size, f"swap size of {path}", minimum=self.page_size) // self.page_size
            )
        created = not os.path.exists(path)
        device = FileDevice(path, nblocks, block_size=self.page_size)
        self._owned_devices.append(device)
        if created and self._remove_created:
            self._remove_on_close[id(device)] = path
        return device

    def swapon(self, path: str | BlockDevice, size: int | str | None = None) -> None:
        """Add a swap device while running (a file is created if ``size`` is given)."""
        with self._kernel.cond:
            self._kernel.check_open()
            if isinstance(path, str):
                self._add_swap((path, size) if size is not None else path)
            else:
                self._add_swap(path)
            self._kernel.set_stuck(False)

    def swapoff(self, device: str | int, *, force: bool = False) -> None:
        """Remove a swap device, moving every page it holds to memory or other devices.

        Refuses with ``SwapExhausted`` when free frames plus the free swap of
        the other devices cannot hold the device's pages; ``force=True`` tries
        anyway (pages move until room runs out, then ``SwapExhausted`` and the
        device stays in use, with nothing lost).
        """
        with self._kernel.cond:
            self._kernel.check_open()
            index = self._device_index(device)
            space = self.space
            before = self.swap_pager.space_statistics()
            dev_stats = next(d for d in before.devices if d.index == index)
            space.swapoff_begin(index)
            try:
                in_use = self.swap_pager.blocks_in_use(index)
                others_free = sum(
                    d.total - d.used - d.bad
                    for d in before.devices
                    if d.index != index and not d.draining
                )
                room = others_free + self._kernel.frames.free_nframes
                if len(in_use) > room and not force:
                    raise SwapExhausted(
                        f"swapoff {dev_stats.name}: {len(in_use)} pages in use, but only {room} "
                        "free frames and blocks elsewhere (use force=True to try anyway)"
                    )
                self.drain_device(index)
                removed = space.swapoff_finish(index)
            except BaseException:
                space.swapoff_cancel(index)
                raise
            if removed in self._owned_devices:
                self._owned_devices.remove(removed)
                removed.close()
                self._remove_file(removed)

    def drain_device(self, index: int) -> None:
        """Move every page whose swap copy is on device ``index`` (lock held)."""
        meta = self.swap_pager.meta
        while True:
            in_use = set(self.swap_pager.blocks_in_use(index).tolist())
            if not in_use:
                return
            owners = [(o, p, b) for o, p, b in meta.items() if b in in_use]
            moved = 0
            for oid, pindex, blk in owners:
                obj = self._kernel.objects.get(oid)
                if obj is None or meta.lookup(oid, pindex) != blk:
                    continue
                # A write fault makes the page dirty and frees its stale swap
                # block; the next pageout puts it on another device.
                hold_page(self._kernel, obj, pindex, write=True, overwrite=False)
                if meta.lookup(oid, pindex) == blk:
                    # A reserved page keeps its block when dirtied: release it.
                    self.swap_pager.release_block(obj, pindex)
                moved += 1
            if not moved:
                # Blocks in flight (a write completing, a strategy request):
                # let them settle, with the lock released.
                self._kernel.cond.wait(0.01)

    def _device_index(self, device: str | int) -> int:
        if isinstance(device, bool) or not isinstance(device, (str, int)):
            raise TypeError(
                f"device must be a swap device's name (str) or index (int), got {device!r}"
            )
        for index, dev in self.space.devices():
            if device == index or device == dev.name:
                return index
        names = ", ".join(d.name for _, d in self.space.devices()) or "none"
        raise ValueError(f"device must name a swap device in use ({names}), got {device!r}")

    def close_devices(self) -> None:
        for device in self._owned_devices:
            try:
                device.close()
            except OSError as exc:  # closing must go on for the others
                log.warning("closing %s: %s", device.name, exc)
            self._remove_file(device)
        self._owned_devices.clear()

    def _remove_file(self, device: BlockDevice) -> None:
        path = self._remove_on_close.pop(id(device), None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("removing swap file %s: %s", path, exc)
