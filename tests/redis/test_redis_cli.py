"""The command line with swap on a real Redis Cluster: ``vmpager run`` verifying every page,
and ``vmpager serve`` whose disk pages to the cluster, read back with ``qemu-img compare``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmpager.testing.nbd import require_client, run_client
from vmpager.testing.redis import RedisClusterProcesses

pytestmark = pytest.mark.redis

MIB = 1 << 20
_VMPAGER = [sys.executable, "-m", "vmpager"]
SRC = str(Path(__file__).parents[2] / "src")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_vmpager_run_on_the_cluster_verifies_every_page(
    redis_cluster: RedisClusterProcesses,
) -> None:
    url = f"{redis_cluster.url}?size=32M&replicas=1"
    result = subprocess.run(
        [
            *_VMPAGER,
            "run",
            "--size",
            "8M",
            "--memory",
            "2M",
            "--accesses",
            "3000",
            "--json",
            "--swap",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    import json

    runs = json.loads(result.stdout)["runs"]  # --json
    assert [r["pattern"] for r in runs] == ["seq", "random", "zipf"]
    for report in runs:
        assert report["bad_pages"] == 0 and report["verified_pages"] == 2048
        assert report["pages_out"] > 0 and report["pages_in"] > 0
    assert f"swap: {url}" in result.stderr


def test_vmpager_run_names_an_unreachable_seed() -> None:
    from vmpager.testing.redis import free_port

    port = free_port()
    result = subprocess.run(
        [*_VMPAGER, "swapinfo", "--swap", f"redis+cluster://127.0.0.1:{port}?size=1M&timeout=1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.clients
def test_vmpager_serve_with_swap_on_the_cluster(
    redis_cluster: RedisClusterProcesses, tmp_path: Path
) -> None:
    require_client("qemu-img")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [
            *_VMPAGER,
            *("serve", "--size", "16M", "--memory", "1M", "--name", "disk", "--unix", str(sock)),
            *("--swap", f"{redis_cluster.url}?size=32M&replicas=1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "serving 'disk'" in line, line + (proc.stderr.read() if proc.stderr else "")
        url = f"nbd+unix:///disk?socket={sock}"
        image = tmp_path / "src.img"
        with open(image, "wb") as f:
            f.truncate(16 * MIB)
            for offset in (0, 5 * MIB + 4096, 12 * MIB):
                f.seek(offset)
                f.write(os.urandom(3 * MIB))
        run_client(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url])
        out = run_client(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), url])
        assert "identical" in out.stdout
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "redis+cluster://" in err  # the swap line names the cluster device
