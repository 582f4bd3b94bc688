"""What protects a page on a swap device: an xxh3-64 checksum, or AES-256-GCM.

One ``Seal`` per swap device holds the per-block metadata, in memory only:

- ``Checksum``: the xxh3-64 of the page written to each block, 8 bytes a
  block. Arrays are sized by the device but come from calloc, so only the
  pages of them that blocks in use have touched take memory. The page goes
  to the device as it is (no copy).
- ``Encryption``: AES-256-GCM under a key made for this device when it was
  added (``os.urandom``; never written anywhere, gone with the process). The
  96-bit nonce is the device block number (64 bits) and the block's write
  generation (32 bits), so a nonce is never used twice under one key. Per
  block, 10 bytes: the low 16 bits of the generation (the high bits of the
  rare blocks written more than 65,535 times are in a dict) and the first 8
  bytes of the GCM tag. A block whose generation would wrap (2^32 writes)
  refuses further writes (``DeviceError``, ENOSPC).

  Why a 64-bit tag: the budget is 16 bytes per swapped page for the
  swap metadata *and* the check, and the swap metadata takes about 5 (a
  96-bit tag alone would break it). NIST SP 800-38D (appendix C) allows
  64-bit tags for messages up to 2^15 bytes provided the number of forgery
  attempts under one key is bounded. Here an attempt is a failed check,
  which the tier sees: every one raises ``CorruptPage`` and retires the
  block, and after ``FORGERY_BUDGET`` (2^20) failures under one key every
  read of the device is refused (``DeviceError`` EIO). With 4 KiB pages
  (2^8 GHASH blocks) the chance that any forgery succeeds is then at most
  about 2^20 * 2^8 / 2^64 = 2^-36.

``seal`` gives the bytes to write for a page; ``unseal`` checks what was read
and, for encryption, decrypts it. Neither blocks; both are thread-safe as
long as one block is not sealed twice at once (the tier's write ordering
guarantees it).
"""

from __future__ import annotations

import errno
import hmac
import os
from array import array
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vmpager.errors import DeviceError

__all__ = [
    "FORGERY_BUDGET",
    "TAG_BYTES",
    "Checksum",
    "Encryption",
    "Seal",
    "load_aead",
    "load_xxh3",
]

#: Bytes of the GCM tag kept per block (the rest of the 16 is dropped).
TAG_BYTES = 8
#: Failed tag checks one device key tolerates before every read is refused.
FORGERY_BUDGET = 1 << 20
_GEN_MAX = (1 << 32) - 1


def load_xxh3() -> Any:
    """The ``xxhash.xxh3_64_intdigest`` function; ``ImportError`` naming the package."""
    try:
        import xxhash
    except ImportError:
        raise ImportError("swap integrity needs the 'xxhash' package: pip install xxhash") from None
    return xxhash.xxh3_64_intdigest


def load_aead() -> Any:
    """The ``AESGCM`` class of ``cryptography``; ``ImportError`` naming the extra."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ImportError(
            "encrypted swap needs the 'cryptography' package: pip install 'vmpager[crypto]'"
        ) from None
    return AESGCM


class Seal(Protocol):
    """Per-block protection of one device; see the module docstring."""

    #: True when ``unseal`` needs the device data in a buffer of its own.
    needs_scratch: bool
    #: Metadata bytes held per device block.
    bytes_per_block: int

    def seal(self, dblk: int, page: memoryview) -> memoryview | bytes:
        """Record ``page`` as block ``dblk``'s content; returns the bytes to write."""
        ...

    def unseal(self, dblk: int, data: memoryview, out: memoryview) -> bool:
        """Check ``data`` read from ``dblk``; on success put the page in ``out``
        (``data`` may be ``out``). False (``out`` unchanged or garbage, never
        returned) on a mismatch."""
        ...

    def seal_run(self, dblk: int, pages: Sequence[memoryview], out: memoryview | None) -> None:
        """``seal`` for consecutive blocks from ``dblk``: the sealed pages are written to
        ``out`` (``needs_scratch``), or are the pages themselves (``out`` None)."""
        ...

    def unseal_run(
        self, dblk: int, data: Sequence[memoryview], out: Sequence[memoryview]
    ) -> list[int]:
        """``unseal`` for consecutive blocks from ``dblk``; the indices that failed."""
        ...

    def nbytes(self) -> int:
        """Bytes of metadata held."""
        ...


class Checksum:
    """xxh3-64 of each block's page; 8 bytes a block."""

    needs_scratch = False
    bytes_per_block = 8

    def __init__(self, nblocks: int) -> None:
        self._hash = load_xxh3()
        self._array: npt.NDArray[np.uint64] = np.zeros(nblocks, dtype=np.uint64)
        # Items through a memoryview: a third of the cost of numpy scalar indexing,
        # and the calloc-backed array still takes memory only where touched.
        self._sums = self._array.data.cast("B").cast("Q")

    def seal(self, dblk: int, page: memoryview) -> memoryview:
        self._sums[dblk] = self._hash(page)
        return page

    def unseal(self, dblk: int, data: memoryview, out: memoryview) -> bool:
        if self._hash(data) != self._sums[dblk]:
            return False
        if data is not out:
            out[:] = data
        return True

    def seal_run(self, dblk: int, pages: Sequence[memoryview], out: memoryview | None) -> None:
        if len(pages) == 1:
            self._sums[dblk] = self._hash(pages[0])
        else:
            self._sums[dblk : dblk + len(pages)] = array("Q", map(self._hash, pages))

    def unseal_run(
        self, dblk: int, data: Sequence[memoryview], out: Sequence[memoryview]
    ) -> list[int]:
        got = list(map(self._hash, data))
        want = self._sums[dblk : dblk + len(got)].tolist()
        if got == want:
            failed = []
        else:
            failed = [k for k, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
        if data is not out:
            for k, (page, target) in enumerate(zip(data, out, strict=True)):
                if page is not target and k not in failed:
                    target[:] = page
        return failed

    def nbytes(self) -> int:
        return int(self._array.nbytes)


class Encryption:
    """AES-256-GCM per block with a per-device key; 10 bytes a block.

    Per block: the first ``TAG_BYTES`` (8) bytes of the GCM tag, and the low
    16 bits of the block's write generation (the high bits of the few blocks
    written more than 65,535 times live in a dict). The nonce is the device
    block (64 bits) and the 32-bit generation. See the module docstring for
    the tag length and its forgery budget.
    """

    needs_scratch = True
    bytes_per_block = TAG_BYTES + 2

    def __init__(self, nblocks: int, name: str) -> None:
        aead = load_aead()
        self._name = name
        # The key lives only in this object: swap written under it is unreadable
        # once the process ends (OpenBSD's swap encryption).
        self._aead = aead(os.urandom(32))
        # numpy's zeros come from calloc: pages of metadata no block has used yet
        # cost no memory (a bytearray would be written through at once).
        self._gen_array: npt.NDArray[np.uint16] = np.zeros(nblocks, dtype=np.uint16)
        self._tag_array: npt.NDArray[np.uint64] = np.zeros(nblocks, dtype=np.uint64)
        # Items through memoryviews (cheaper than numpy scalar indexing).
        self._gens = self._gen_array.data.cast("B").cast("H")
        self._tags = self._tag_array.data.cast("B").cast("Q")
        #: Block -> its generation's bits above the low 16, for blocks past 65,535 writes.
        self._gen_high: dict[int, int] = {}
        #: Failed tag checks so far (the forgery budget, ``FORGERY_BUDGET``).
        self.failures = 0

    def generation(self, dblk: int) -> int:
        """The block's current write generation (0: never written under this key)."""
        low: int = self._gens[dblk]
        if not self._gen_high:
            return low
        return (self._gen_high.get(dblk, 0) << 16) | low

    def _set_generation(self, dblk: int, gen: int) -> None:
        self._gens[dblk] = gen & 0xFFFF
        high = gen >> 16
        if high:
            self._gen_high[dblk] = high
        else:
            self._gen_high.pop(dblk, None)

    def seal(self, dblk: int, page: memoryview) -> memoryview:
        gen = self.generation(dblk)
        if gen == _GEN_MAX:
            raise DeviceError(
                errno.ENOSPC, self._name, dblk, "block retired: its nonce generations are used up"
            )
        gen += 1
        self._set_generation(dblk, gen)
        sealed = self._aead.encrypt(_nonce(dblk, gen), page, None)
        size = len(page)
        self._tags[dblk] = int.from_bytes(sealed[size : size + TAG_BYTES], "little")
        return memoryview(sealed)[:size]

    def unseal(self, dblk: int, data: memoryview, out: memoryview) -> bool:
        gen: int = self._gens[dblk]
        if self._gen_high:
            gen |= self._gen_high.get(dblk, 0) << 16
        if gen == 0:
            return False  # never written under this key
        if self.failures >= FORGERY_BUDGET:
            raise DeviceError(
                errno.EIO,
                self._name,
                dblk,
                f"{self.failures} failed authentications: the device's key is no longer trusted",
            )
        nonce = _nonce(dblk, gen)
        size = len(data)
        # GCM is counter mode: encrypting the ciphertext under its nonce gives the
        # plaintext; encrypting that plaintext again gives the full tag, whose first
        # 8 bytes must match. (The AEAD's decrypt wants all 16 tag bytes; what the
        # two calls compute never leaves this process.)
        plain = memoryview(self._aead.encrypt(nonce, data, None))[:size]
        tag = self._aead.encrypt(nonce, plain, None)[size : size + TAG_BYTES]
        if not hmac.compare_digest(tag, self._tags[dblk].to_bytes(TAG_BYTES, "little")):
            self.failures += 1
            return False
        out[:] = plain
        return True

    def seal_run(self, dblk: int, pages: Sequence[memoryview], out: memoryview | None) -> None:
        assert out is not None
        size = len(pages[0]) if pages else 0
        for k, page in enumerate(pages):
            out[k * size : (k + 1) * size] = self.seal(dblk + k, page)

    def unseal_run(
        self, dblk: int, data: Sequence[memoryview], out: Sequence[memoryview]
    ) -> list[int]:
        unseal = self.unseal
        return [
            k
            for k, (page, target) in enumerate(zip(data, out, strict=True))
            if not unseal(dblk + k, page, target)
        ]

    def nbytes(self) -> int:
        # A dict entry (slot, key and value ints) costs about 100 bytes.
        arrays = int(self._gen_array.nbytes) + int(self._tag_array.nbytes)
        return arrays + 100 * len(self._gen_high)


def _nonce(dblk: int, gen: int) -> bytes:
    """The 96-bit GCM nonce: device block (64 bits, little-endian) then generation (32)."""
    return dblk.to_bytes(8, "little") + gen.to_bytes(4, "little")
