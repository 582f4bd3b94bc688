"""Test helpers for NBD: real client programs, and a raw protocol client for bad-input tests.

``require_client`` skips the calling test, naming the Debian package to
install, when a client program (qemu-io, nbdinfo, fio...) is missing;
``run_client`` runs one with a time limit and fails with its output when it
exits non-zero. ``RawNbdClient`` speaks the protocol byte by byte over a
socket so tests can send exactly what they want, including garbage.
``make_tls_credentials`` writes a certificate authority, a server and a
client certificate in qemu's and libnbd's directory layouts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmpager.nbd import protocol as p

__all__ = [
    "CLIENT_PACKAGES",
    "Chunk",
    "RawNbdClient",
    "Reply",
    "TlsCredentials",
    "make_tls_credentials",
    "require_client",
    "run_client",
    "serve_command",
]

#: Debian package that ships each client program the tests use.
CLIENT_PACKAGES: dict[str, str] = {
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "fio": "fio",
    "nbdkit": "nbdkit",
}


def require_client(program: str) -> str:
    """Path of ``program``; skips the current test (never silently) when it is missing."""
    import pytest

    path = shutil.which(program)
    if path is None:
        package = CLIENT_PACKAGES.get(program, program)
        pytest.skip(f"{program} not installed: apt-get install {package}")
    return path


def run_client(
    args: Sequence[str], *, timeout_s: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a client program; with ``check``, a non-zero exit fails with stdout and stderr."""
    require_client(args[0])
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@contextlib.contextmanager
def serve_command(args: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Run ``python -m vmpager serve ARGS`` until the block ends.

    Yields the first line it prints (the first export's URL) and a list that,
    once the block ends, holds what the command wrote to stderr. The command
    is stopped with SIGTERM and must exit 0; a failure shows its stderr.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmpager", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        yield line, stderr
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
        stderr.append(err)
    if proc.returncode != 0:
        raise AssertionError(f"vmpager serve exited {proc.returncode}: {err}")


@dataclass(frozen=True)
class TlsCredentials:
    """Directories written by ``make_tls_credentials``.

    ``server``: ca-cert.pem, server-cert.pem, server-key.pem (``--tls-creds``).
    ``client``: ca-cert.pem, client-cert.pem, client-key.pem (qemu's
    ``tls-creds-x509,endpoint=client`` and libnbd's ``tls-certificates``).
    ``client_no_cert``: ca-cert.pem only (a client that presents no certificate).
    """

    server: Path
    client: Path
    client_no_cert: Path


def make_tls_credentials(
    directory: Path, *, hostnames: Sequence[str] = ("localhost", "127.0.0.1")
) -> TlsCredentials:
    """A fresh CA and a server and client certificate it signed, under ``directory``.

    The server certificate names ``hostnames`` (DNS names, or IP addresses)
    as subject alternative names. Keys are ECDSA P-256; certificates are
    valid from an hour ago for a day. Calling it twice gives two unrelated CAs.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def pem_cert(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"vmpager test CA {os.urandom(4).hex()}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        common: str, usage: x509.ObjectIdentifier, sans: Sequence[str]
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            entries: list[x509.GeneralName] = []
            for host in sans:
                try:
                    entries.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    entries.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
        return pem_cert(builder.sign(ca_key, hashes.SHA256())), pem_key(key)

    server_cert, server_key = issue(hostnames[0], ExtendedKeyUsageOID.SERVER_AUTH, hostnames)
    client_cert, client_key = issue("vmpager test client", ExtendedKeyUsageOID.CLIENT_AUTH, ())
    creds = TlsCredentials(directory / "server", directory / "client", directory / "client-nocert")
    files = {
        creds.server: {"server-cert.pem": server_cert, "server-key.pem": server_key},
        creds.client: {"client-cert.pem": client_cert, "client-key.pem": client_key},
        creds.client_no_cert: {},
    }
    for folder, extra in files.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca-cert.pem").write_bytes(pem_cert(ca_cert))
        for filename, content in extra.items():
            (folder / filename).write_bytes(content)
            if filename.endswith("-key.pem"):
                (folder / filename).chmod(0o600)
    return creds


@dataclass
class Chunk:
    """One structured reply chunk as received."""

    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & p.NBD_REPLY_FLAG_DONE)

    @property
    def error(self) -> int:
        """The error value of an error chunk (0 for other chunks)."""
        if self.type & 0x8000:
            return int(struct.unpack_from(">I", self.payload)[0])
        return 0


@dataclass
class Reply:
    """A whole reply: a simple one (``chunks`` empty) or all chunks of a structured one."""

    cookie: int
    error: int
    data: bytes = b""
    chunks: list[Chunk] = field(default_factory=list)


class RawNbdClient:
    """A byte-level NBD client for tests; every method blocks (5 s socket timeout).

    Use ``connect`` (greeting and client flags), then options
    (``option``/``read_option_reply`` or the ``go`` shortcut), then requests
    (``request`` + ``read_reply``). Nothing is validated beyond what is needed
    to parse the server's bytes, so tests can also send malformed input.
    """

    def __init__(self, address: tuple[str, int] | str, *, timeout_s: float = 5.0) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(address)
        self.structured = False
        self.handshake_flags = 0
        self.size_bytes = 0
        self.transmission_flags = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, nbytes: int) -> bytes:
        """Exactly ``nbytes`` bytes; ``EOFError`` if the server closed first."""
        parts = []
        remaining = nbytes
        while remaining:
            chunk = self.sock.recv(remaining)
            if not chunk:
                raise EOFError(f"server closed with {remaining} of {nbytes} bytes missing")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def is_closed_by_server(self, timeout_s: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout_s`` (data is drained)."""
        self.sock.settimeout(timeout_s)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    # -- handshake -----------------------------------------------------------------------

    def connect(
        self, client_flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES
    ) -> None:
        """Read the greeting and send ``client_flags``."""
        magic, opt_magic, flags = p.HANDSHAKE.unpack(self.recv_exact(p.HANDSHAKE.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise AssertionError(f"bad greeting {magic:#x} {opt_magic:#x}")
        self.handshake_flags = flags
        self.send(p.CLIENT_FLAGS.pack(client_flags))

    def option(self, option: int, data: bytes = b"", *, magic: int = p.IHAVEOPT) -> None:
        self.send(p.OPTION_HEADER.pack(magic, option, len(data)) + data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        """``(option, reply type, data)`` of the next option reply."""
        magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack(
            self.recv_exact(p.OPTION_REPLY_HEADER.size)
        )
        if magic != p.OPTION_REPLY_MAGIC:
            raise AssertionError(f"bad option reply magic {magic:#x}")
        return option, reply, self.recv_exact(length)

    def read_option_replies(self) -> list[tuple[int, bytes]]:
        """All replies to one option up to the final ACK or error: ``[(type, data), ...]``."""
        replies = []
        while True:
            _, reply, data = self.read_option_reply()
            replies.append((reply, data))
            if reply in (p.NBD_REP_ACK,) or reply & (1 << 31):
                return replies

    @staticmethod
    def info_data(name: str, requests: Sequence[int] = ()) -> bytes:
        encoded = name.encode()
        return (
            struct.pack(">I", len(encoded))
            + encoded
            + struct.pack(f">H{len(requests)}H", len(requests), *requests)
        )

    @staticmethod
    def meta_data(name: str, queries: Sequence[str]) -> bytes:
        encoded = name.encode()
        out = struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(queries))
        for query in queries:
            out += struct.pack(">I", len(query.encode())) + query.encode()
        return out

    def go(self, name: str = "", *, structured: bool = False, meta: bool = False) -> None:
        """Optionally negotiate structured replies and base:allocation, then NBD_OPT_GO."""
        if structured or meta:
            self.option(p.NBD_OPT_STRUCTURED_REPLY)
            replies = self.read_option_replies()
            if replies[-1][0] != p.NBD_REP_ACK:
                raise AssertionError(f"structured replies refused: {replies}")
            self.structured = True
        if meta:
            self.option(p.NBD_OPT_SET_META_CONTEXT, self.meta_data(name, [p.BASE_ALLOCATION]))
            replies = self.read_option_replies()
            if replies[-1][0] != p.NBD_REP_ACK or len(replies) != 2:
                raise AssertionError(f"base:allocation not selected: {replies}")
        self.option(p.NBD_OPT_GO, self.info_data(name, [p.NBD_INFO_BLOCK_SIZE]))
        for reply, data in self.read_option_replies():
            if reply == p.NBD_REP_INFO and struct.unpack_from(">H", data)[0] == p.NBD_INFO_EXPORT:
                _, self.size_bytes, self.transmission_flags = p.INFO_EXPORT.unpack(data)
            elif reply != p.NBD_REP_INFO and reply != p.NBD_REP_ACK:
                raise AssertionError(f"NBD_OPT_GO failed with reply {reply:#x}: {data!r}")

    # -- transmission --------------------------------------------------------------------

    def request(
        self,
        command: int,
        *,
        offset: int = 0,
        length: int = 0,
        cookie: int = 1,
        flags: int = 0,
        data: bytes = b"",
        magic: int = p.REQUEST_MAGIC,
    ) -> None:
        """Send one request header (and ``data`` right after it)."""
        self.send(p.REQUEST.pack(magic, flags, command, cookie, offset, length) + data)

    def read_reply(self, read_length: int = 0) -> Reply:
        """The next reply; ``read_length`` is the payload of a successful simple read reply."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if error == 0 and read_length else b""
            return Reply(cookie, error, data)
        if magic != p.STRUCTURED_REPLY_MAGIC:
            raise AssertionError(f"bad reply magic {magic:#x}")
        chunks: list[Chunk] = []
        while True:
            if chunks:
                magic = struct.unpack(">I", self.recv_exact(4))[0]
                if magic != p.STRUCTURED_REPLY_MAGIC:
                    raise AssertionError(f"bad chunk magic {magic:#x}")
            flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            chunks.append(Chunk(flags, ctype, cookie, self.recv_exact(length)))
            if flags & p.NBD_REPLY_FLAG_DONE:
                break
        error = next((c.error for c in chunks if c.error), 0)
        return Reply(chunks[0].cookie, error, self._assemble(chunks), chunks)

    @staticmethod
    def _assemble(chunks: list[Chunk]) -> bytes:
        """Concatenate the content chunks of a read in offset order (holes as zeros)."""
        pieces: list[tuple[int, bytes]] = []
        for chunk in chunks:
            if chunk.type == p.NBD_REPLY_TYPE_OFFSET_DATA:
                offset = struct.unpack_from(">Q", chunk.payload)[0]
                pieces.append((offset, chunk.payload[8:]))
            elif chunk.type == p.NBD_REPLY_TYPE_OFFSET_HOLE:
                offset, size = struct.unpack(">QI", chunk.payload)
                pieces.append((offset, bytes(size)))
        pieces.sort()
        return b"".join(piece for _, piece in pieces)
