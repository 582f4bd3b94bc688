"""Swap tiers: a compressed pool in memory, per-page integrity and encrypted swap.

``SwapTier`` sits between the swap space and its devices (``tier.py``);
``codec.py`` compresses pages, ``seal.py`` checksums or encrypts them.
"""

from vmpager.tiers.codec import ALGORITHMS, Codec
from vmpager.tiers.seal import Checksum, Encryption
from vmpager.tiers.tier import SwapTier, TierStatistics

__all__ = ["ALGORITHMS", "Checksum", "Codec", "Encryption", "SwapTier", "TierStatistics"]
