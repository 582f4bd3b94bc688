"""Page compression for the compressed tier: lz4 or zstd, and same-filled pages.

A page is *same-filled* when it is one 8-byte word repeated (zeros
included, as zswap's same-filled pages): it is kept as that word alone. Other
pages are compressed; the caller keeps the result only when it is at most
``accept_limit`` bytes (zswap's reject of poorly compressing pages).

The libraries are optional extras (``pip install 'vmpager[compress]'``);
asking for an algorithm whose library is missing raises ``ImportError``
naming the extra. Compressors are per thread (zstd contexts are not
thread-safe); lz4's block functions hold no state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ALGORITHMS", "Codec", "same_fill_word"]

#: Algorithms ``compress=`` accepts.
ALGORITHMS = ("lz4", "zstd")


def same_fill_word(page: memoryview) -> int | None:
    """The 8-byte word (little-endian) ``page`` repeats, or None. Cost: one memcmp."""
    # A buffer equal to itself shifted by 8 bytes is periodic with period 8.
    if page[8:] == page[:-8]:
        return int.from_bytes(page[:8], "little")
    return None


def fill_word(page: memoryview, word: int) -> None:
    """Write ``word`` over all of ``page`` (its length a multiple of 8)."""
    pattern = word.to_bytes(8, "little")
    if word == 0:
        page[:] = bytes(len(page))
    else:
        page[:] = pattern * (len(page) // 8)


def _import(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(
            f"compression needs the '{module.split('.')[0]}' package: "
            "pip install 'vmpager[compress]'"
        ) from None


class Codec:
    """Compress and decompress pages of ``page_size`` bytes with ``algorithm``.

    ``compress`` returns the compressed bytes; ``decompress_into`` writes the
    page into a buffer of ``page_size`` bytes. Both are thread-safe and do
    not block; cost is the library's (lz4: about 3 µs per 4 KiB page here).
    """

    def __init__(self, algorithm: str, page_size: int) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"compress must be one of {ALGORITHMS} or None, got {algorithm!r}")
        self.algorithm = algorithm
        self.page_size = page_size
        self._local = threading.local()
        self.compress: Callable[[memoryview], bytes]
        self._decompress: Callable[[bytes], bytes]
        if algorithm == "lz4":
            block = _import("lz4.block")
            size = page_size

            def lz4_compress(page: memoryview) -> bytes:
                return bytes(block.compress(page, store_size=False))

            def lz4_decompress(data: bytes) -> bytes:
                return bytes(block.decompress(data, uncompressed_size=size))

            self.compress = lz4_compress
            self._decompress = lz4_decompress
        else:
            zstandard = _import("zstandard")
            self._zstd = zstandard
            self.compress = self._zstd_compress
            self._decompress = self._zstd_decompress

    def _contexts(self) -> tuple[Any, Any]:
        local = self._local
        contexts: tuple[Any, Any] | None = getattr(local, "contexts", None)
        if contexts is None:
            contexts = (
                self._zstd.ZstdCompressor(level=1, write_content_size=False),
                self._zstd.ZstdDecompressor(),
            )
            local.contexts = contexts
        return contexts

    def _zstd_compress(self, page: memoryview) -> bytes:
        return bytes(self._contexts()[0].compress(page))

    def _zstd_decompress(self, data: bytes) -> bytes:
        return bytes(self._contexts()[1].decompress(data, max_output_size=self.page_size))

    def decompress_into(self, data: bytes, out: memoryview) -> None:
        """Decompress ``data`` into ``out`` (``page_size`` bytes); ``ValueError`` if it
        does not give exactly one page."""
        page = self._decompress(data)
        if len(page) != self.page_size:
            raise ValueError(f"{self.algorithm}: decompressed {len(page)} bytes, not one page")
        out[:] = page
