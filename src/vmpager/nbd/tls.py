"""TLS credentials for the NBD server, in qemu's directory layout.

A credentials directory holds ``ca-cert.pem`` (the certificate authority
that signed the server's certificate and, when client certificates are
checked, the clients'), ``server-cert.pem`` and ``server-key.pem``: the
layout of qemu's ``tls-creds-x509`` object and of ``qemu-nbd --tls-creds``,
so one directory serves both. ``server_context`` turns it into the
``ssl.SSLContext`` that ``NbdServer(tls=...)`` upgrades connections with
after ``NBD_OPT_STARTTLS``. TLS 1.2 is the oldest version accepted, as the
protocol asks.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path
from typing import Final

__all__ = ["CA_CERT", "SERVER_CERT", "SERVER_KEY", "is_loopback", "server_context"]

CA_CERT: Final = "ca-cert.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"


def server_context(
    creds_dir: str | os.PathLike[str], *, verify_client: bool = False
) -> ssl.SSLContext:
    """A server-side TLS context from ``creds_dir`` (qemu's layout).

    ``verify_client`` requires every client to present a certificate signed
    by ``ca-cert.pem`` (qemu's ``verify-peer=on``); otherwise clients
    authenticate the server only. Raises ``ValueError`` naming the missing
    file or the directory, and ``ssl.SSLError`` for a certificate or key
    that does not load. Reads the files once; cheap.
    """
    directory = Path(creds_dir)
    if not directory.is_dir():
        raise ValueError(f"--tls-creds must be a directory, got {str(directory)!r}")
    needed = [SERVER_CERT, SERVER_KEY] + ([CA_CERT] if verify_client else [])
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise ValueError(
            f"TLS credentials directory {str(directory)!r} lacks {', '.join(missing)} "
            f"(expected qemu's layout: {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(directory / SERVER_CERT, directory / SERVER_KEY)
    if verify_client:
        context.load_verify_locations(cafile=directory / CA_CERT)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an address) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
