"""NBD over TLS (NBD_OPT_STARTTLS) with the real clients: qemu-img/qemu-io and nbdinfo/nbdcopy.

Certificates are made in the test (``make_tls_credentials``, with
``cryptography``). A client without TLS is refused, one trusting another CA
fails, and with client certificates required a client without one fails.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpager.cli import main as cli_main
from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd import protocol as p
from vmpager.nbd.tls import is_loopback, server_context
from vmpager.testing.nbd import (
    RawNbdClient,
    TlsCredentials,
    make_tls_credentials,
    require_client,
    run_client,
    serve_command,
)

SIZE = 8 << 20


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> TlsCredentials:
    return make_tls_credentials(tmp_path_factory.mktemp("tls") / "good")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsCredentials:
    return make_tls_credentials(tmp_path_factory.mktemp("tls") / "other")


@pytest.fixture(params=[0, 2], ids=["inline", "workers"])
def server(request: pytest.FixtureRequest, creds: TlsCredentials) -> Iterator[NbdServer]:
    with NbdServer(
        {"disk": MemoryBackend(SIZE)},
        tls=server_context(creds.server),
        workers_per_connection=int(request.param),
        handshake_timeout_s=5.0,
    ) as srv:
        yield srv
        srv.check()


def qemu_opts(server: NbdServer) -> str:
    return (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={server.port},"
        "export=disk,tls-creds=tls0"
    )


def qemu_tls_object(directory: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={directory},endpoint=client"]


def libnbd_uri(server: NbdServer, directory: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/disk?tls-certificates={directory}"


# -- real clients ---------------------------------------------------------------------------------


def test_qemu_io_writes_and_reads_back_over_tls(server: NbdServer, creds: TlsCredentials) -> None:
    run_client(
        [
            "qemu-io",
            *qemu_tls_object(creds.client),
            "--image-opts",
            qemu_opts(server),
            "-c",
            "write -P 0xa5 64k 1M",
            "-c",
            "read -P 0xa5 64k 1M",
            "-c",
            "read -P 0 0 64k",
        ]
    )
    stats = server.statistics()
    assert stats.tls_sessions >= 1 and stats.writes >= 1 and stats.protocol_errors == 0


def test_qemu_img_info_over_tls(server: NbdServer, creds: TlsCredentials) -> None:
    out = run_client(
        ["qemu-img", "info", *qemu_tls_object(creds.client), "--image-opts", qemu_opts(server)]
    ).stdout
    assert f"{SIZE} bytes" in out


def test_nbdinfo_and_nbdcopy_over_tls(
    server: NbdServer, creds: TlsCredentials, tmp_path: Path
) -> None:
    require_client("nbdcopy")
    uri = libnbd_uri(server, creds.client)
    info = run_client(["nbdinfo", uri]).stdout
    assert "with TLS" in info
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 << 20) + bytes(SIZE - (3 << 20)))
    run_client(["nbdcopy", str(src), uri])
    back = tmp_path / "out.bin"
    run_client(["nbdcopy", uri, str(back)])
    assert back.read_bytes() == src.read_bytes()


def test_clients_without_tls_are_refused(server: NbdServer) -> None:
    plain = f"nbd://127.0.0.1:{server.port}/disk"
    result = run_client(["nbdinfo", plain], check=False)
    assert result.returncode != 0
    result = run_client(["qemu-img", "info", plain], check=False)
    assert result.returncode != 0 and "TLS" in result.stderr
    assert server.statistics().handshakes_completed == 0


def test_clients_trusting_another_ca_fail(server: NbdServer, other_ca: TlsCredentials) -> None:
    result = run_client(["nbdinfo", libnbd_uri(server, other_ca.client)], check=False)
    assert result.returncode != 0 and "certificate" in result.stderr.lower()
    result = run_client(
        ["qemu-img", "info", *qemu_tls_object(other_ca.client), "--image-opts", qemu_opts(server)],
        check=False,
    )
    assert result.returncode != 0 and "issuer" in result.stderr
    assert server.statistics().handshakes_completed == 0


def test_required_client_certificates(creds: TlsCredentials, other_ca: TlsCredentials) -> None:
    context = server_context(creds.server, verify_client=True)
    with NbdServer({"disk": MemoryBackend(SIZE)}, tls=context) as server:
        assert run_client(
            ["nbdinfo", "--size", libnbd_uri(server, creds.client)]
        ).stdout.strip() == str(SIZE)
        run_client(
            ["qemu-img", "info", *qemu_tls_object(creds.client), "--image-opts", qemu_opts(server)]
        )
        for directory in (creds.client_no_cert, other_ca.client):
            # A client that presents no certificate, or one from another CA, fails.
            result = run_client(["nbdinfo", "--size", libnbd_uri(server, directory)], check=False)
            assert result.returncode != 0
        result = run_client(
            [
                "qemu-img",
                "info",
                *qemu_tls_object(creds.client_no_cert),
                "--image-opts",
                qemu_opts(server),
            ],
            check=False,
        )
        assert result.returncode != 0
        assert server.statistics().handshakes_completed == 2


# -- raw protocol over Python's ssl ---------------------------------------------------------------


def starttls(server: NbdServer, creds: TlsCredentials) -> tuple[RawNbdClient, ssl.SSLSocket]:
    client = RawNbdClient(server.address)
    client.connect()
    client.option(p.NBD_OPT_LIST)
    assert client.read_option_replies()[-1][0] == p.NBD_REP_ERR_TLS_REQD
    client.option(p.NBD_OPT_STARTTLS)
    assert client.read_option_replies() == [(p.NBD_REP_ACK, b"")]
    context = ssl.create_default_context(cafile=str(creds.client / "ca-cert.pem"))
    tls = context.wrap_socket(client.sock, server_hostname="localhost")
    client.sock = tls
    return client, tls


def test_raw_starttls_then_transmission(server: NbdServer, creds: TlsCredentials) -> None:
    client, tls = starttls(server, creds)
    with client:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        client.option(p.NBD_OPT_STARTTLS)
        assert client.read_option_replies()[-1][0] == p.NBD_REP_ERR_INVALID
        client.go("disk", structured=True)
        client.request(p.NBD_CMD_WRITE, offset=4096, length=5, data=b"hello", cookie=1)
        assert client.read_reply().error == 0
        client.request(p.NBD_CMD_READ, offset=4096, length=5, cookie=2)
        assert client.read_reply().data == b"hello"
        client.request(p.NBD_CMD_DISC)


def test_bytes_sent_ahead_of_the_tls_handshake_drop_the_client(
    server: NbdServer, creds: TlsCredentials
) -> None:
    client = RawNbdClient(server.address)
    with client:
        client.connect()
        # STARTTLS and a plaintext option in one packet: the option could be injected by
        # anyone on the path, so the server must not carry it into the TLS session.
        client.send(
            p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_STARTTLS, 0)
            + p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_LIST, 0)
        )
        assert client.is_closed_by_server()
    assert server.statistics().handshakes_completed == 0


def test_export_name_before_tls_hangs_up(server: NbdServer) -> None:
    with RawNbdClient(server.address) as client:
        client.connect()
        client.option(p.NBD_OPT_EXPORT_NAME, b"disk")
        assert client.is_closed_by_server()


def test_starttls_without_tls_is_unsupported() -> None:
    with NbdServer({"disk": MemoryBackend(SIZE)}) as server, RawNbdClient(server.address) as c:
        c.connect()
        c.option(p.NBD_OPT_STARTTLS)
        assert c.read_option_replies()[-1][0] == p.NBD_REP_ERR_UNSUP
        c.go("disk")


def test_url_names_tls(creds: TlsCredentials, tmp_path: Path) -> None:
    context = server_context(creds.server)
    with NbdServer({"d": MemoryBackend(SIZE)}, tls=context) as server:
        assert server.url().startswith("nbds://")
    with NbdServer({"d": MemoryBackend(SIZE)}, unix_path=tmp_path / "s", tls=context) as server:
        assert server.url().startswith("nbds+unix:///d?socket=")


def test_server_context_names_what_is_missing(tmp_path: Path, creds: TlsCredentials) -> None:
    with pytest.raises(ValueError, match="directory"):
        server_context(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"server-key\.pem"):
        server_context(creds.client)
    with pytest.raises(TypeError, match="SSLContext"):
        NbdServer({"d": MemoryBackend(SIZE)}, tls="yes")  # type: ignore[arg-type]


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


# -- the serve command ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--listen", "0.0.0.0:0"], "--insecure"),
        (["--tls", "require"], "--tls-creds"),
        (["--tls-verify-client"], "needs TLS"),
    ],
)
def test_serve_refuses_unsafe_or_incomplete_tls_settings(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--size", "1M", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_with_tls_creds_and_insecure_warning(creds: TlsCredentials) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    args = ["--size", "8M", "--memory", "2M", "--name", "disk", "--listen", f"127.0.0.1:{port}"]
    with serve_command([*args, "--tls-creds", str(creds.server)]) as (line, _stderr):
        assert "nbds://" in line, line
        uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={creds.client}"
        assert run_client(["nbdinfo", "--size", uri]).stdout.strip() == str(8 << 20)
        plain = run_client(["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], check=False)
        assert plain.returncode != 0
    # Beyond loopback without TLS: allowed with --insecure, and it says so.
    with serve_command(
        ["--size", "1M", "--memory", "1M", "--listen", "0.0.0.0:0", "--insecure"]
    ) as (
        line,
        stderr,
    ):
        assert "serving" in line, line
    assert "warning: serving without TLS on 0.0.0.0" in stderr[0]
