"""Open the swap device a URL names (``devices/url.py`` parses it).

Apart from the parser so that the devices, which read parsed URLs, and the
parser do not import each other.
"""

from __future__ import annotations

from dataclasses import replace

from vmpager.devices.protocol import BlockDevice
from vmpager.devices.redis import RedisDevice
from vmpager.devices.redis_cluster import RedisClusterDevice
from vmpager.devices.url import MAX_REPLICAS, parse_swap_url
from vmpager.units import check_int

__all__ = ["open_swap_url"]


def open_swap_url(spec: str, block_size: int, *, replicas: int | None = None) -> BlockDevice:
    """Open the swap device ``spec`` names, with ``size // block_size`` blocks.

    ``replicas`` applies when the URL has no ``replicas`` parameter. The device
    connects, authenticates and checks the server(s) (eviction policy,
    replicas) before this returns: ``ValueError`` for a bad URL or an unsuitable
    server, ``DeviceError`` naming the server when it cannot be reached or
    refuses the credentials. Blocks for the connection set-up (at most about
    ``timeout`` per server).
    """
    url = parse_swap_url(spec)
    nblocks = url.size // block_size
    if nblocks < 1:
        raise ValueError(
            f"swap URL {url.display}: size {url.size} is smaller than one block "
            f"({block_size} bytes)"
        )
    if replicas is not None and url.replicas is None:
        url = replace(
            url, replicas=check_int(replicas, "replicas", minimum=0, maximum=MAX_REPLICAS)
        )
    if url.cluster:
        return RedisClusterDevice.from_url(url, nblocks, block_size)
    return RedisDevice.from_url(url, nblocks, block_size)
