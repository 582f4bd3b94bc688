"""The bounded pool of page frames: one page-aligned anonymous mapping.

Every resident page lives in one frame; the number of frames is the memory
budget divided by the page size, and it never grows. Frames are handed out
and returned by index; ``view`` and ``array`` expose the arena for copies.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmpager.errors import InvariantViolation

__all__ = ["FramePool", "FrameStatistics"]


@dataclass(frozen=True, slots=True)
class FrameStatistics:
    nframes: int
    free_nframes: int
    page_size: int


class FramePool:
    """``nframes`` frames of ``page_size`` bytes in one mmap arena.

    Not thread-safe by itself: the VM lock guards it. The arena is private
    anonymous memory, page-aligned, so frame slices can be handed to O_DIRECT
    I/O without bouncing.
    """

    def __init__(self, nframes: int, page_size: int) -> None:
        if nframes < 1:
            raise ValueError(f"nframes must be >= 1, got {nframes}")
        self.nframes = nframes
        self.page_size = page_size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self._arena = mmap.mmap(-1, nframes * page_size, flags=flags)
        #: The arena itself: slicing it copies bytes out in one call, the cheapest
        #: way to move a few bytes (the hit paths of read and write use it).
        self.arena = self._arena
        self.view = memoryview(self._arena)
        self.array: npt.NDArray[np.uint8] = np.frombuffer(self._arena, dtype=np.uint8).reshape(
            nframes, page_size
        )
        # Pop from the end: frames are handed out in ascending order at first.
        self._free: list[int] = list(range(nframes - 1, -1, -1))
        self._is_free = bytearray(b"\x01" * nframes)

    @property
    def free_nframes(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """Take a free frame; None when none is free. O(1)."""
        if not self._free:
            return None
        frame = self._free.pop()
        self._is_free[frame] = 0
        return frame

    def free(self, frame: int) -> None:
        """Give a frame back. O(1). ValueError on a double free."""
        if self._is_free[frame]:
            raise ValueError(f"frame {frame} freed twice")
        self._is_free[frame] = 1
        self._free.append(frame)

    def free_many(self, frames: list[int]) -> None:
        """``free`` each of ``frames``. ValueError on a double free
        (a frame already free or listed twice), nothing freed then.

        They are handed out again in ascending order (the free list is a
        stack: they go onto it in descending order). The page daemon frees
        the frames of a pageout together, and the next pages faulted in, in
        their order, get them in frame order: consecutive pages then tend to
        sit in consecutive frames, which a pageout writes as one buffer
        (frames freed and reused in any other order scatter a stream's
        pages over the arena for good). O(n log n) for n frames.
        """
        is_free = self._is_free
        for k, frame in enumerate(frames):
            if is_free[frame]:
                for earlier in frames[:k]:
                    is_free[earlier] = 0
                raise ValueError(f"frame {frame} freed twice")
            is_free[frame] = 1
        self._free.extend(sorted(frames, reverse=True))

    def frame_view(self, frame: int) -> memoryview:
        """A writable view of one frame (no copy)."""
        start = frame * self.page_size
        return self.view[start : start + self.page_size]

    def run_views(self, frames: Sequence[int]) -> list[memoryview]:
        """Writable views of ``frames`` (non-empty), in order, as few as possible:
        one per run of consecutive frame numbers (no copy). A write or copy of
        many pages then takes one buffer per run. O(len(frames))."""
        view = self.view
        size = self.page_size
        buffers: list[memoryview] = []
        start = prev = frames[0]
        for frame in frames[1:]:
            if frame != prev + 1:
                buffers.append(view[start * size : (prev + 1) * size])
                start = frame
            prev = frame
        buffers.append(view[start * size : (prev + 1) * size])
        return buffers

    def zero(self, frame: int) -> None:
        self.array[frame].fill(0)

    def is_free(self, frame: int) -> bool:
        return bool(self._is_free[frame])

    def statistics(self) -> FrameStatistics:
        return FrameStatistics(self.nframes, len(self._free), self.page_size)

    def check(self) -> None:
        """Raise ``InvariantViolation`` listing every broken invariant (``problems``)."""
        found = self.problems()
        if found:
            raise InvariantViolation(found)

    def problems(self) -> list[str]:
        """Return the violated invariants (empty when consistent)."""
        problems: list[str] = []
        if len(set(self._free)) != len(self._free):
            problems.append("frame free list holds a frame twice")
        if sum(self._is_free) != len(self._free):
            problems.append(
                f"frame free map counts {sum(self._is_free)} free, list {len(self._free)}"
            )
        return problems

    def close(self) -> None:
        self.array = np.empty((0, self.page_size), dtype=np.uint8)
        self.view.release()
        try:
            self._arena.close()
        except BufferError:  # a caller still holds a view; the GC will unmap it
            pass
