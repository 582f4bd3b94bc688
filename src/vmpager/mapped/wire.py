"""Messages between a client and its pager process: pickles framed by an 8-byte length.

Descriptors ride with a message's header (SCM_RIGHTS). Both ends are
processes of the same program, so pickle is safe here.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

__all__ = ["recv_message", "send_message"]

_HEADER = struct.Struct("Q")


def send_message(sock: socket.socket, message: object, fds: list[int] | None = None) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = _HEADER.pack(len(payload))
    if fds:
        sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array(fds)))])
        sock.sendall(payload)
    else:
        sock.sendall(header + payload)


def _fd_array(fds: list[int]) -> bytes:
    return struct.pack(f"{len(fds)}i", *fds)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        chunk = sock.recv(min(n, 1 << 22))
        if not chunk:
            raise EOFError("the peer closed the socket")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv_message(sock: socket.socket) -> tuple[Any, list[int]]:
    """One message and the descriptors that came with it; EOFError at the end."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, 4)
    if not data:
        raise EOFError("the peer closed the socket")
    if len(data) < _HEADER.size:
        data += _recv_exact(sock, _HEADER.size - len(data))
    (length,) = _HEADER.unpack(data)
    return pickle.loads(_recv_exact(sock, length)), list(fds)
