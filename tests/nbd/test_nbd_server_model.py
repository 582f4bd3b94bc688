"""NbdServer against a plain bytearray model, driven by random requests from two raw clients."""

from __future__ import annotations

import struct

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd import protocol as p
from vmpager.testing.nbd import RawNbdClient

SIZE = 48 * 1024 + 300  # not page-aligned on purpose

offsets = st.integers(0, SIZE + 10)
lengths = st.integers(0, 20000)


class ServerMachine(RuleBasedStateMachine):
    clients = Bundle("clients")
    workers = 0

    def __init__(self) -> None:
        super().__init__()
        self.backend = MemoryBackend(SIZE)
        self.server = NbdServer(
            {"m": self.backend}, sparse_read_bytes=8192, workers_per_connection=self.workers
        ).start()
        self.model = bytearray(SIZE)
        self.cookie = 0
        self.open: list[RawNbdClient] = []

    @initialize(target=clients)
    def simple_client(self) -> RawNbdClient:
        return self._client(structured=False)

    @initialize(target=clients)
    def structured_client(self) -> RawNbdClient:
        return self._client(structured=True)

    def _client(self, *, structured: bool) -> RawNbdClient:
        c = RawNbdClient(self.server.address)
        c.connect()
        c.go("m", structured=structured, meta=structured)
        self.open.append(c)
        return c

    def _next_cookie(self) -> int:
        self.cookie += 1
        return self.cookie

    @rule(c=clients, offset=offsets, length=lengths, byte=st.integers(0, 255), fua=st.booleans())
    def write(self, c: RawNbdClient, offset: int, length: int, byte: int, fua: bool) -> None:
        cookie = self._next_cookie()
        data = bytes([byte]) * length
        flags = p.NBD_CMD_FLAG_FUA if fua else 0
        c.request(
            p.NBD_CMD_WRITE, offset=offset, length=length, data=data, cookie=cookie, flags=flags
        )
        reply = c.read_reply()
        assert reply.cookie == cookie
        if offset + length > SIZE:
            assert reply.error == p.NBD_ENOSPC
        else:
            assert reply.error == 0
            self.model[offset : offset + length] = data

    @rule(c=clients, offset=offsets, length=lengths)
    def read(self, c: RawNbdClient, offset: int, length: int) -> None:
        cookie = self._next_cookie()
        c.request(p.NBD_CMD_READ, offset=offset, length=length, cookie=cookie)
        reply = c.read_reply(length)
        assert reply.cookie == cookie
        if offset + length > SIZE:
            assert reply.error == p.NBD_EINVAL
        else:
            assert reply.error == 0
            assert reply.data == self.model[offset : offset + length]

    @rule(
        c=clients,
        offset=offsets,
        length=lengths,
        command=st.sampled_from(["trim", "zero", "zero_no_hole"]),
    )
    def zero(self, c: RawNbdClient, offset: int, length: int, command: str) -> None:
        cookie = self._next_cookie()
        if command == "trim":
            c.request(p.NBD_CMD_TRIM, offset=offset, length=length, cookie=cookie)
            past_end_error = p.NBD_EINVAL
        else:
            flags = p.NBD_CMD_FLAG_NO_HOLE if command == "zero_no_hole" else 0
            c.request(
                p.NBD_CMD_WRITE_ZEROES, offset=offset, length=length, cookie=cookie, flags=flags
            )
            past_end_error = p.NBD_ENOSPC
        reply = c.read_reply()
        if offset + length > SIZE:
            assert reply.error == past_end_error
        else:
            assert reply.error == 0
            self.model[offset : offset + length] = bytes(length)

    @rule(c=clients, offset=st.integers(0, SIZE - 1), length=st.integers(1, SIZE))
    def block_status(self, c: RawNbdClient, offset: int, length: int) -> None:
        if not c.structured:
            return
        length = min(length, SIZE - offset)
        cookie = self._next_cookie()
        c.request(p.NBD_CMD_BLOCK_STATUS, offset=offset, length=length, cookie=cookie)
        (chunk,) = c.read_reply().chunks
        values = struct.unpack(f">{len(chunk.payload) // 4}I", chunk.payload)
        position = offset
        for extent_length, flags in zip(values[1::2], values[2::2], strict=True):
            if flags & p.NBD_STATE_ZERO:
                assert not any(self.model[position : position + extent_length])
            position += extent_length
        assert position == offset + length

    @rule(c=clients)
    def flush(self, c: RawNbdClient) -> None:
        cookie = self._next_cookie()
        c.request(p.NBD_CMD_FLUSH, cookie=cookie)
        assert c.read_reply().error == 0

    @invariant()
    def consistent(self) -> None:
        self.server.check()
        self.backend.check()

    def teardown(self) -> None:
        for c in self.open:
            c.close()
        self.server.close()
        out = bytearray(SIZE)
        self.backend.read_into(0, memoryview(out))
        assert out == self.model


TestServerMachine = ServerMachine.TestCase
TestServerMachine.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, derandomize=True
)


class PooledServerMachine(ServerMachine):
    workers = 2


TestPooledServerMachine = PooledServerMachine.TestCase
TestPooledServerMachine.settings = settings(
    max_examples=10, stateful_step_count=30, deadline=None, derandomize=True
)
