"""Real redis-server processes for tests: standalone servers and a small Redis Cluster.

``RedisServer`` starts one private ``redis-server`` on 127.0.0.1 (a free port,
no persistence); ``RedisClusterProcesses`` starts ``masters * (1 + replicas)``
of them in cluster mode and joins them with ``redis-cli --cluster create``.
Both can SIGKILL and restart a server (same port, same cluster identity file,
empty data) to test failures. ``server_binaries()`` finds the programs, or
returns the Debian package to install in the reason.

The cluster runs with a 2 s ``cluster-node-timeout`` (a failover takes about
3 s; with 1 s, missed pings on a loaded machine started failovers nobody
asked for) and ``cluster-require-full-coverage no`` (a lost master fails only
its slots).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "RedisClusterProcesses",
    "RedisServer",
    "free_port",
    "make_tls_files",
    "server_binaries",
]

PACKAGE = "redis-server"
_START_TIMEOUT_S = 15.0


def server_binaries() -> tuple[str, str] | str:
    """``(redis-server, redis-cli)`` paths, or why they are missing (naming the package)."""
    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if server is None or cli is None:
        missing = " and ".join(
            n for n, p in (("redis-server", server), ("redis-cli", cli)) if not p
        )
        return f"{missing} not installed (Debian package {PACKAGE}; scripts/test.sh installs it)"
    return server, cli


def free_port(*, bus: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (with ``bus``: port + 10000 free as well, for a cluster)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def _client(port: int, password: str | None = None, ca: str | None = None) -> Any:
    import redis

    tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": ca} if ca is not None else {}
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5, **tls)


def make_tls_files(directory: Path) -> dict[str, str]:
    """A private CA and a certificate for 127.0.0.1 signed by it (``openssl``), one day long.

    Returns the paths: ``ca`` (the CA certificate), ``cert`` and ``key`` (the
    server's). ``RuntimeError`` when the openssl program is missing.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed (Debian package openssl)")
    files = {name: str(directory / f"{name}.pem") for name in ("ca", "ca_key", "cert", "key")}
    csr = str(directory / "server.csr")
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    quiet = {"check": True, "capture_output": True, "timeout": 60}
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", files["ca_key"], "-out", files["ca"], "-subj", "/CN=vmpager test CA"),
        ],
        **quiet,  # type: ignore[call-overload]
    )
    subprocess.run(
        [
            *(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", files["key"]),
            *("-out", csr, "-subj", "/CN=127.0.0.1"),
        ],
        **quiet,  # type: ignore[call-overload]
    )
    subprocess.run(
        [
            *(openssl, "x509", "-req", "-in", csr, "-CA", files["ca"], "-CAkey", files["ca_key"]),
            *("-CAcreateserial", "-out", files["cert"], "-days", "1", "-extfile", str(ext)),
        ],
        **quiet,  # type: ignore[call-overload]
    )
    return files


class RedisServer:
    """A private redis-server on 127.0.0.1 without persistence; ``stop``/``kill``/``restart``."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        extra: list[str] | None = None,
        password: str | None = None,
        cluster_dir: Path | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        found = server_binaries()
        if binary is None:
            if isinstance(found, str):
                raise RuntimeError(found)
            binary = found[0]
        self.binary = binary
        self.port = port if port is not None else free_port(bus=cluster_dir is not None)
        self.password = password
        self.ca = tls["ca"] if tls is not None else None
        listen = ["--port", str(self.port)]
        if tls is not None:  # TLS only: the plain port is off
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            listen += ["--tls-cert-file", tls["cert"], "--tls-key-file", tls["key"]]
            listen += ["--tls-ca-cert-file", tls["ca"]]
        args = [
            binary,
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        if password is not None:
            args += ["--requirepass", password, "--masterauth", password]
        if cluster_dir is not None:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(cluster_dir / f"nodes-{self.port}.conf"),
                "--cluster-node-timeout",
                "2000",
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                str(cluster_dir),
            ]
        self.args = args + (extra or [])
        scheme = "rediss" if tls is not None else "redis"
        self.url = f"{scheme}://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and wait until it answers PING."""
        import redis

        self.process = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = self.client()
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def client(self) -> Any:
        """A new ``redis.Redis`` for this server (the caller closes it)."""
        return _client(self.port, self.password, self.ca)

    def kill(self) -> None:
        """SIGKILL the server (its data is gone; a restart comes back empty)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Kill (if running) and start again on the same port: empty, same cluster identity."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class RedisClusterProcesses:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        found = server_binaries()
        if isinstance(found, str):
            raise RuntimeError(found)
        server, cli = found
        self._tmp = tempfile.TemporaryDirectory(prefix="vmpager-redis-cluster-")
        directory = Path(self._tmp.name)
        self.servers: list[RedisServer] = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.servers.append(RedisServer(server, cluster_dir=directory))
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(s.address for s in self.servers),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            self.wait_until_ok(expect_masters=masters)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def by_address(self, address: str) -> RedisServer:
        """The server at ``host:port``."""
        for server in self.servers:
            if server.address == address:
                return server
        raise KeyError(address)

    def roles(self) -> dict[str, str | None]:
        """``host:port`` -> ``"master"``/``"replica"`` (None for a server that does not answer)."""
        out: dict[str, str | None] = {}
        for server in self.servers:
            client = server.client()
            try:
                role = client.execute_command("ROLE")[0]
                out[server.address] = "master" if role in (b"master", "master") else "replica"
            except Exception:
                out[server.address] = None
            finally:
                client.close()
        return out

    def masters(self) -> list[str]:
        """Addresses of the servers that are masters now."""
        return sorted(a for a, r in self.roles().items() if r == "master")

    def wait_until_ok(self, expect_masters: int | None = None, timeout: float = 30.0) -> None:
        """Wait until every live server reports ``cluster_state:ok``, every replica's link to
        its master is up, and (if given) there are ``expect_masters`` masters."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for server in self.servers:
                if server.process is None or server.process.poll() is not None:
                    continue
                client = server.client()
                try:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    replication = client.info("replication")
                    synced = (
                        replication.get("role") == "master"
                        or replication.get("master_link_status") == "up"
                    )
                    states.append("cluster_state:ok" in text and synced)
                except Exception:
                    states.append(False)
                finally:
                    client.close()
            masters_ok = expect_masters is None or len(self.masters()) == expect_masters
            if states and all(states) and masters_ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not become ok")
            time.sleep(0.05)

    def replicas_of(self, master: str) -> list[str]:
        """Addresses of the replicas of the master at ``master`` (ask it before killing it)."""
        client = self.by_address(master).client()
        try:
            nodes = client.execute_command("CLUSTER", "NODES")
        finally:
            client.close()
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        lines = [line.split() for line in text.splitlines() if line.strip()]
        my_id = next(fields[0] for fields in lines if "myself" in fields[2])
        return [fields[1].split("@")[0] for fields in lines if fields[3] == my_id]

    def wait_for_failover(self, replicas: list[str], timeout: float = 30.0) -> str:
        """Wait until one of ``replicas`` (of a dead master) is a master; return its address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for address in replicas:
                if self.roles_of([address]).get(address) == "master":
                    return address
            time.sleep(0.05)
        raise RuntimeError(f"none of {replicas} took over")

    def roles_of(self, addresses: list[str]) -> dict[str, str | None]:
        """``roles`` for some servers only."""
        out: dict[str, str | None] = {}
        for address in addresses:
            client = self.by_address(address).client()
            try:
                role = client.execute_command("ROLE")[0]
                out[address] = "master" if role in (b"master", "master") else "replica"
            except Exception:
                out[address] = None
            finally:
                client.close()
        return out

    def stop(self) -> None:
        """Stop every server and remove the cluster files."""
        for server in self.servers:
            server.stop()
        self._tmp.cleanup()
