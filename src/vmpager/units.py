"""Sizes and counts given by users: parsing and argument checking.

Every public entry point that takes a size goes through here, so a bad value
gets one kind of message everywhere: the argument's name, the value, and the
allowed range.
"""

from __future__ import annotations

import re
from typing import SupportsIndex

__all__ = ["check_int", "format_size", "parse_size"]

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
    "TIB": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(
    value: int | str, name: str, *, minimum: int = 0, maximum: int | None = None, multiple: int = 1
) -> int:
    """Return ``value`` as a byte count.

    Accepts an int, or a string such as ``"512M"``, ``"4 GiB"``, ``"4096"``
    (binary units: K = 1024). Raises ``ValueError`` naming ``name`` when the
    value is malformed, has an unknown unit, lies outside
    ``[minimum, maximum]`` or is not a multiple of ``multiple``, and
    ``TypeError`` for other types (bool included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be an int or a size string like '512M', got {value!r}")
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(f"{name}: cannot parse size {value!r} (expected e.g. '512M', '4G')")
        number, unit = match.groups()
        factor = _UNITS.get(unit.upper())
        if factor is None:
            raise ValueError(
                f"{name}: unknown unit {unit!r} in {value!r} (allowed: B, K, M, G, T, "
                "optionally with B or iB)"
            )
        scaled = float(number) * factor if "." in number else int(number) * factor
        if scaled != int(scaled):
            raise ValueError(f"{name}: {value!r} is not a whole number of bytes")
        nbytes = int(scaled)
    else:
        nbytes = value
    return check_int(nbytes, name, minimum=minimum, maximum=maximum, multiple=multiple)


def check_int(
    value: SupportsIndex,
    name: str,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    multiple: int = 1,
) -> int:
    """Return ``value`` as an int after checking its type and range.

    Raises ``TypeError`` for non-integers (bool included) and ``ValueError``
    naming ``name`` and the allowed range otherwise.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    number = value.__index__()
    if number < minimum or (maximum is not None and number > maximum):
        upper = "inf" if maximum is None else str(maximum)
        raise ValueError(f"{name} must be in [{minimum}, {upper}], got {number}")
    if multiple > 1 and number % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple}, got {number}")
    return number


def format_size(nbytes: int) -> str:
    """Render a byte count with a binary unit, e.g. ``1.5G``."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(nbytes) >= factor:
            value = nbytes / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{nbytes}B"
