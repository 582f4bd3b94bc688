"""Real redis-server fixtures: one server per module, a 3-master + 3-replica cluster per session.

Skipped, naming the Debian package, when redis-server or redis-cli is missing
(scripts/test.sh installs them as root).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("redis", reason="redis-py is not installed (pip install 'vmpager[redis]')")

from vmpager.testing.redis import (
    RedisClusterProcesses,
    RedisServer,
    server_binaries,
)


def _require_binaries() -> None:
    found = server_binaries()
    if isinstance(found, str):
        pytest.skip(found)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    _require_binaries()
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def private_server() -> Iterator[RedisServer]:
    _require_binaries()
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def second_server() -> Iterator[RedisServer]:
    _require_binaries()
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _cluster_processes() -> Iterator[RedisClusterProcesses]:
    _require_binaries()
    cluster = RedisClusterProcesses(masters=3, replicas=1)
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(_cluster_processes: RedisClusterProcesses) -> RedisClusterProcesses:
    """The session's cluster, settled: every live node ok and every replica linked
    (a test that killed a server, or a failover on a loaded machine, may have left
    it moving)."""
    _cluster_processes.wait_until_ok()
    return _cluster_processes
