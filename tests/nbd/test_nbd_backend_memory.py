"""MemoryBackend against a plain model: bytes, exact holes and extents."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmpager.errors import InvariantViolation
from vmpager.nbd import Backend, MemoryBackend
from vmpager.nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO

BLOCK = 512
NPAGES = 24
SIZE = NPAGES * BLOCK - 100  # the last page is partial on purpose


def model_extents(
    data: bytearray, allocated: set[int], offset: int, length: int
) -> list[tuple[int, int]]:
    """Coalesced (length, flags) runs the backend must report for the model state."""
    runs: list[tuple[int, int]] = []
    end = offset + length
    position = offset
    while position < end:
        page = position // BLOCK
        stop = min(end, (page + 1) * BLOCK)
        if page not in allocated:
            flags = NBD_STATE_HOLE | NBD_STATE_ZERO
        elif not any(data[page * BLOCK : (page + 1) * BLOCK]):
            flags = NBD_STATE_ZERO
        else:
            flags = 0
        if runs and runs[-1][1] == flags:
            runs[-1] = (runs[-1][0] + stop - position, flags)
        else:
            runs.append((stop - position, flags))
        position = stop
    return runs


ranges = st.integers(0, SIZE).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(0, SIZE - off))
)


class MemoryBackendMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = MemoryBackend(SIZE, block_size=BLOCK)
        # The model pads to whole pages so page contents can be compared directly.
        self.data = bytearray(NPAGES * BLOCK)
        self.allocated: set[int] = set()

    def _pages(self, offset: int, length: int) -> range:
        if length == 0:
            return range(0)
        return range(offset // BLOCK, -(-(offset + length) // BLOCK))

    @rule(r=ranges, byte=st.integers(0, 255))
    def write(self, r: tuple[int, int], byte: int) -> None:
        offset, length = r
        self.backend.write(offset, bytes([byte]) * length)
        self.data[offset : offset + length] = bytes([byte]) * length
        self.allocated.update(self._pages(offset, length))

    def _zero(self, offset: int, length: int, may_trim: bool) -> None:
        self.data[offset : offset + length] = bytes(length)
        for page in self._pages(offset, length):
            whole = offset <= page * BLOCK and (page + 1) * BLOCK <= offset + length
            if not may_trim:
                self.allocated.add(page)
            elif whole or not any(self.data[page * BLOCK : (page + 1) * BLOCK]):
                # Partial pages are dropped once they hold only zeros.
                self.allocated.discard(page)

    @rule(r=ranges)
    def trim(self, r: tuple[int, int]) -> None:
        self.backend.trim(*r)
        self._zero(*r, may_trim=True)

    @rule(r=ranges, may_trim=st.booleans())
    def write_zeroes(self, r: tuple[int, int], may_trim: bool) -> None:
        self.backend.write_zeroes(*r, may_trim=may_trim)
        self._zero(*r, may_trim=may_trim)

    @rule(r=ranges)
    def read(self, r: tuple[int, int]) -> None:
        offset, length = r
        out = bytearray(b"\xff" * length)
        self.backend.read_into(offset, memoryview(out))
        assert out == self.data[offset : offset + length]

    @rule(r=ranges)
    def extents(self, r: tuple[int, int]) -> None:
        offset, length = r
        expected = model_extents(self.data, self.allocated, offset, length)
        assert self.backend.extents(offset, length) == expected

    @invariant()
    def consistent(self) -> None:
        self.backend.check()
        assert self.backend.npages_allocated == len(self.allocated)


TestMemoryBackendMachine = MemoryBackendMachine.TestCase
TestMemoryBackendMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True
)


def test_memory_backend_implements_backend_protocol() -> None:
    assert isinstance(MemoryBackend(4096), Backend)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_bytes": -1}, "size_bytes"),
        ({"size_bytes": 4096, "block_size": 1000}, "power of two"),
        ({"size_bytes": 4096, "block_size": 256}, "block_size"),
        ({"size_bytes": 4096, "block_size": 1 << 17}, "block_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryBackend(**kwargs)


def test_size_must_be_int() -> None:
    with pytest.raises(TypeError, match="size_bytes"):
        MemoryBackend("4096")  # type: ignore[arg-type]


def test_out_of_range_requests_raise_value_error() -> None:
    backend = MemoryBackend(8192)
    with pytest.raises(ValueError, match="range"):
        backend.write(8000, b"x" * 200)
    with pytest.raises(ValueError, match="range"):
        backend.read_into(8192, memoryview(bytearray(1)))
    with pytest.raises(ValueError, match="range"):
        backend.trim(-1, 10)
    with pytest.raises(ValueError, match="range"):
        backend.extents(0, 8193)


def test_extents_of_a_huge_sparse_range_are_cheap() -> None:
    backend = MemoryBackend(1 << 50)
    backend.write(1 << 40, b"x")
    extents = backend.extents(0, 1 << 50)
    assert extents == [(1 << 40, 3), (4096, 0), ((1 << 50) - (1 << 40) - 4096, 3)]
    backend.trim(0, 1 << 50)
    assert backend.npages_allocated == 0


def test_statistics_count_operations() -> None:
    backend = MemoryBackend(1 << 20)
    backend.write(0, b"a" * 5000)
    backend.read_into(0, memoryview(bytearray(100)))
    backend.flush()
    backend.cache(0, 10)
    backend.trim(0, 4096)
    stats = backend.statistics()
    assert (stats.write_ops, stats.read_ops, stats.flush_ops, stats.cache_ops, stats.trim_ops) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert (stats.bytes_written, stats.bytes_read, stats.npages_allocated) == (5000, 100, 1)


def test_check_reports_a_corrupted_page() -> None:
    backend = MemoryBackend(1 << 20)
    backend.write(0, b"a")
    backend._pages[0] = bytearray(10)
    with pytest.raises(InvariantViolation, match="10 bytes"):
        backend.check()


def test_concurrent_writers_to_disjoint_ranges() -> None:
    backend = MemoryBackend(1 << 20, block_size=4096)

    def writer(i: int) -> None:
        for j in range(200):
            # Unaligned neighbours share pages: read-modify-write must not lose bytes.
            backend.write(i * 1000 + j % 7, bytes([i + 1]))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        out = bytearray(7)
        backend.read_into(i * 1000, memoryview(out))
        assert out == bytes([i + 1]) * 7
