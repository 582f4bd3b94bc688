"""The userfaultfd/memfd/SCM_RIGHTS layer, with a real fault server in another process.

The server (a forked child) receives the userfaultfd and the memfd over a
Unix socket, fills pages from its own memory with UFFDIO_COPY, aliases them
into its memory with a shared mapping, tracks writes with write protection
and evicts pages while keeping their contents (write-protect, copy, mremap,
punch the hole).
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct

import numpy as np
import pytest

from vmpager.mapped import uffd as U

PS = 4096
N = 32


def _serve(sock: socket.socket, base: int) -> None:
    """The fault server: page p holds byte p at offset 0 until written."""
    _, fds = U.recv_fds(sock, 64, 2)
    ufd, mfd = fds
    server = U.Userfaultfd(ufd)
    arena = U.reserve(N * PS)
    scratch = U.reserve(PS)
    for p in range(N):
        ctypes.memset(arena + p * PS, p, 1)
    bound: set[int] = set()
    dirty: set[int] = set()
    while True:
        ready, _, _ = select.select([ufd, sock], [], [], 10)
        if not ready:
            return
        if sock in ready:
            cmd = sock.recv(64)
            if not cmd:
                return
            word, arg = cmd.split()
            p = int(arg)
            if word == b"evict":
                server.writeprotect(base + p * PS, PS, True)
                ctypes.memmove(scratch, arena + p * PS, PS)
                U.mremap_fixed(scratch, PS, arena + p * PS)
                U.map_fixed(scratch, PS)
                U.fallocate_punch(mfd, p * PS, PS)
                bound.discard(p)
            value = ctypes.c_uint8.from_address(arena + p * PS + 1).value
            sock.send(struct.pack("qqq", value, U.allocated_bytes(mfd), int(p in dirty)))
        if ufd in ready:
            for fault in server.read_faults():
                p = (fault.address - base) // PS
                if fault.wp:
                    dirty.add(p)
                    server.writeprotect(base + p * PS, PS, False)
                elif p in bound:
                    server.wake(base + p * PS, PS)
                else:
                    server.copy(base + p * PS, arena + p * PS, PS, wp=not fault.write)
                    if fault.write:
                        dirty.add(p)
                    U.map_fixed(arena + p * PS, PS, mfd, p * PS)
                    bound.add(p)


@pytest.fixture
def region():  # type: ignore[no-untyped-def]
    try:
        uf = U.Userfaultfd()
    except U.UserfaultfdUnavailable as exc:
        pytest.skip(str(exc))
    fd = U.memfd("test", N * PS)
    base = U.map_shared(fd, N * PS)
    U.madvise(base, N * PS, U.MADV_DONTFORK)
    uf.register(base, N * PS)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ours.close()
            _serve(theirs, base)
        finally:
            os._exit(0)
    theirs.close()
    U.send_fds(ours, b"fds", [uf.fd, fd])
    array = np.frombuffer((ctypes.c_uint8 * (N * PS)).from_address(base), dtype=np.uint8)

    def ask(word: str, p: int) -> tuple[int, int, int]:
        ours.send(f"{word} {p}".encode())
        return struct.unpack("qqq", ours.recv(24))  # type: ignore[return-value]

    yield array, ask, fd
    ours.close()
    os.waitpid(pid, 0)
    U.munmap(base, N * PS)
    os.close(fd)
    uf.close()


# Python >= 3.12 warns about fork() in a process with threads: deliberate here.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
@pytest.mark.timeout(30)
def test_faults_fill_track_writes_and_evict_keeping_contents(region) -> None:  # type: ignore[no-untyped-def]
    array, ask, fd = region
    assert U.allocated_bytes(fd) == 0
    assert [int(array[p * PS]) for p in (3, 7)] == [3, 7]  # read faults, filled write-protected
    assert U.allocated_bytes(fd) == 2 * PS
    assert ask("look", 3)[2] == 0  # clean
    array[3 * PS + 1] = 99  # write-protect fault: the server marks it dirty
    value, allocated, dirty = ask("look", 3)
    assert (value, allocated, dirty) == (99, 2 * PS, 1)  # the server's alias sees the write
    array[9 * PS + 1] = 5  # a write fault on a missing page
    assert ask("look", 9)[2] == 1
    value, allocated, _ = ask("evict", 3)
    assert value == 99 and allocated == 2 * PS  # the hole is punched, the copy is kept
    assert int(array[3 * PS + 1]) == 99  # a fault brings it back
    assert U.allocated_bytes(fd) == 3 * PS
    array[3 * PS + 1] = 100
    assert ask("look", 3)[0] == 100


def test_unavailable_error_says_how_to_enable(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(U.os, "open", refuse)
    monkeypatch.setattr(U, "_SYS_USERFAULTFD", {})
    with pytest.raises(U.UserfaultfdUnavailable, match=r"vm\.unprivileged_userfaultfd"):
        U.Userfaultfd()


def test_fds_cross_a_socket() -> None:
    a, b = socket.socketpair()
    fd = U.memfd("x", PS)
    os.pwrite(fd, b"hello", 0)
    U.send_fds(a, b"m", [fd])
    data, fds = U.recv_fds(b, 16, 1)
    assert data == b"m" and os.pread(fds[0], 5, 0) == b"hello"
    U.fallocate_punch(fds[0], 0, PS)
    assert os.pread(fd, 5, 0) == bytes(5)
    for f in (fd, *fds):
        os.close(f)
    a.close()
    b.close()


@pytest.mark.parametrize("batched", [True, False])
def test_madvise_pages_empties_exactly_the_pages_given(
    batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not batched:  # a kernel without process_madvise: one madvise each
        monkeypatch.setattr(U, "_NR_PROCESS_MADVISE", None)
        monkeypatch.setattr(U, "_self_pid", 0)
    n = 2100  # more than one process_madvise call (1024 ranges each)
    base = U.reserve(n * PS)
    try:
        ctypes.memset(base, 7, n * PS)
        chosen = [p for p in range(n) if p % 3 != 1]
        U.madvise_pages([base + p * PS for p in chosen], PS, U.MADV_DONTNEED)
        view = np.frombuffer((ctypes.c_char * (n * PS)).from_address(base), np.uint8)
        firsts = view.reshape(n, PS)[:, 0]
        want = np.full(n, 7, np.uint8)
        want[chosen] = 0
        assert np.array_equal(firsts, want)
        del view, firsts
    finally:
        U.munmap(base, n * PS)
        monkeypatch.undo()
        U._self_pid = 0  # the next call opens its pidfd again
