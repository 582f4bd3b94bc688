"""What protects a page on a swap device: an xxh3-64 checksum, or AES-256-GCM.

One ``Seal`` per swap device holds the per-block metadata, in memory only:

- ``Checksum``: the xxh3-64 of the page written to each block, 8 bytes a
  block. Arrays are sized by the device but come from calloc, so only the
  pages of them that blocks in use have touched take memory. The page goes
  to the device as it is (no copy).
- ``Encryption``: AES-256-GCM under a key made for this device when it was
  added (``os.urandom``; never written anywhere, gone with the process). The
  96-bit nonce is the device block number (64 bits) and the block's write
  generation (32 bits), so a nonce is never used twice under one key; per
  block, 4 bytes of generation and the first 12 bytes of the GCM tag (a
  96-bit tag, as NIST SP 800-38D allows): 16 bytes a block. A block whose
  generation would wrap refuses further writes (``DeviceError``, ENOSPC).

``seal`` gives the bytes to write for a page; ``unseal`` checks what was read
and, for encryption, decrypts it. Neither blocks; both are thread-safe as
long as one block is not sealed twice at once (the tier's write ordering
guarantees it).
"""

from __future__ import annotations

import errno
import hmac
import os
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from vmpager.errors import DeviceError

__all__ = ["TAG_BYTES", "Checksum", "Encryption", "Seal", "load_aead", "load_xxh3"]

#: Bytes of the GCM tag kept per block (the rest of the 16 is dropped).
TAG_BYTES = 12
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

    def nbytes(self) -> int:
        """Bytes of metadata held."""
        ...


class Checksum:
    """xxh3-64 of each block's page; 8 bytes a block."""

    needs_scratch = False
    bytes_per_block = 8

    def __init__(self, nblocks: int) -> None:
        self._hash = load_xxh3()
        self._sums: npt.NDArray[np.uint64] = np.zeros(nblocks, dtype=np.uint64)

    def seal(self, dblk: int, page: memoryview) -> memoryview:
        self._sums[dblk] = self._hash(page)
        return page

    def unseal(self, dblk: int, data: memoryview, out: memoryview) -> bool:
        if self._hash(data) != int(self._sums[dblk]):
            return False
        if data is not out:
            out[:] = data
        return True

    def nbytes(self) -> int:
        return int(self._sums.nbytes)


class Encryption:
    """AES-256-GCM per block with a per-device key; 16 bytes a block."""

    needs_scratch = True
    bytes_per_block = 4 + TAG_BYTES

    def __init__(self, nblocks: int, name: str) -> None:
        aead = load_aead()
        self._name = name
        # The key lives only in this object: swap written under it is unreadable
        # once the process ends (OpenBSD's swap encryption).
        self._aead = aead(os.urandom(32))
        self._gens: npt.NDArray[np.uint32] = np.zeros(nblocks, dtype=np.uint32)
        # numpy's zeros come from calloc: pages of metadata no block has used yet
        # cost no memory (a bytearray would be written through at once).
        self._tag_array: npt.NDArray[np.uint8] = np.zeros(nblocks * TAG_BYTES, dtype=np.uint8)
        self._tags = self._tag_array.data

    def _nonce(self, dblk: int, gen: int) -> bytes:
        return dblk.to_bytes(8, "little") + gen.to_bytes(4, "little")

    def seal(self, dblk: int, page: memoryview) -> memoryview:
        gen = int(self._gens[dblk])
        if gen == _GEN_MAX:
            raise DeviceError(
                errno.ENOSPC, self._name, dblk, "block retired: its nonce generations are used up"
            )
        gen += 1
        self._gens[dblk] = gen
        sealed = self._aead.encrypt(self._nonce(dblk, gen), page, None)
        size = len(page)
        self._tags[dblk * TAG_BYTES : (dblk + 1) * TAG_BYTES] = sealed[size : size + TAG_BYTES]
        return memoryview(sealed)[:size]

    def unseal(self, dblk: int, data: memoryview, out: memoryview) -> bool:
        gen = int(self._gens[dblk])
        if gen == 0:
            return False  # never written under this key
        nonce = self._nonce(dblk, gen)
        size = len(data)
        # GCM is counter mode: encrypting the ciphertext under its nonce gives the
        # plaintext; encrypting that plaintext again gives the full tag, whose first
        # 12 bytes must match. (The AEAD's decrypt wants all 16 tag bytes.)
        plain = memoryview(self._aead.encrypt(nonce, data, None))[:size]
        tag = self._aead.encrypt(nonce, plain, None)[size : size + TAG_BYTES]
        want = bytes(self._tags[dblk * TAG_BYTES : (dblk + 1) * TAG_BYTES])
        if not hmac.compare_digest(tag, want):
            return False
        out[:] = plain
        return True

    def nbytes(self) -> int:
        return int(self._gens.nbytes) + int(self._tag_array.nbytes)
