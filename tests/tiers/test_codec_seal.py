"""Compression of pages and the per-block seals (checksum, AES-GCM)."""

from __future__ import annotations

import builtins
import os
from typing import Any

import pytest

from vmpager.errors import DeviceError
from vmpager.tiers.codec import Codec, fill_word, same_fill_word
from vmpager.tiers.seal import Checksum, Encryption

PAGE = 4096


def _compressible(seed: int) -> bytes:
    rnd = os.urandom(1600)
    return (rnd + bytes(PAGE - 1600 - 8) + seed.to_bytes(8, "little"))[:PAGE]


@pytest.mark.parametrize("word", [0, 1, 0xDEADBEEF_01020304, (1 << 64) - 1])
def test_same_filled_pages_are_found_and_refilled(word: int) -> None:
    page = memoryview(bytearray(word.to_bytes(8, "little") * (PAGE // 8)))
    assert same_fill_word(page) == word
    out = memoryview(bytearray(b"\xaa" * PAGE))
    fill_word(out, word)
    assert out == page


@pytest.mark.parametrize("where", [0, 7, 8, PAGE - 1])
def test_one_different_byte_is_not_same_filled(where: int) -> None:
    page = bytearray(PAGE)
    page[where] = 1
    assert same_fill_word(memoryview(page)) is None


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_codec_round_trip(algorithm: str) -> None:
    codec = Codec(algorithm, PAGE)
    for seed in range(20):
        page = _compressible(seed)
        data = codec.compress(memoryview(page))
        assert len(data) < PAGE * 3 // 4
        out = memoryview(bytearray(PAGE))
        codec.decompress_into(data, out)
        assert out == page
    random_page = os.urandom(PAGE)
    assert len(codec.compress(memoryview(random_page))) > PAGE * 3 // 4


def test_unknown_algorithm_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"compress must be one of \('lz4', 'zstd'\)"):
        Codec("gzip", PAGE)


@pytest.mark.parametrize(("algorithm", "module"), [("lz4", "lz4.block"), ("zstd", "zstandard")])
def test_a_missing_library_names_the_extra(
    algorithm: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_such_module(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == module:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_such_module)
    with pytest.raises(ImportError, match=r"pip install 'vmpager\[compress\]'"):
        Codec(algorithm, PAGE)


def test_checksum_detects_any_flipped_bit() -> None:
    seal = Checksum(4)
    page = bytearray(_compressible(3))
    written = seal.seal(2, memoryview(page))
    assert written == page  # the page itself goes to the device
    out = memoryview(bytearray(PAGE))
    assert seal.unseal(2, memoryview(bytearray(page)), out) and out == page
    for bit in (0, 9, PAGE * 8 - 1):
        bad = bytearray(page)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert not seal.unseal(2, memoryview(bad), memoryview(bytearray(PAGE)))
    assert not seal.unseal(3, memoryview(bytearray(page)), out)  # another block's sum
    assert seal.nbytes() == 4 * 8 and seal.bytes_per_block == 8


def test_encryption_round_trip_hides_the_page_and_never_repeats_a_nonce() -> None:
    seal = Encryption(8, "dev")
    page = b"MARKER!!" * (PAGE // 8)
    first = bytes(seal.seal(5, memoryview(page)))
    second = bytes(seal.seal(5, memoryview(page)))
    assert b"MARKER" not in first and b"MARKER" not in second
    assert first != second  # same page, same block: a new nonce each time
    out = memoryview(bytearray(PAGE))
    assert seal.unseal(5, memoryview(bytearray(second)), out) and out == page
    # The older ciphertext is stale: its nonce is not the block's current one.
    assert not seal.unseal(5, memoryview(bytearray(first)), memoryview(bytearray(PAGE)))
    assert seal.nbytes() == 8 * 10 and seal.bytes_per_block == 10


def test_encryption_detects_tampering_and_keys_differ_per_device() -> None:
    one, two = Encryption(4, "a"), Encryption(4, "b")
    page = os.urandom(PAGE)
    sealed = bytearray(one.seal(1, memoryview(page)))
    two.seal(1, memoryview(page))
    assert not two.unseal(1, memoryview(bytearray(sealed)), memoryview(bytearray(PAGE)))
    for where in (0, 100, PAGE - 1):
        bad = bytearray(sealed)
        bad[where] ^= 0x01
        out = memoryview(bytearray(PAGE))
        assert not one.unseal(1, memoryview(bad), out)
        assert bytes(out) == bytes(PAGE)  # nothing of it was handed out
    assert not one.unseal(2, memoryview(bytearray(sealed)), memoryview(bytearray(PAGE)))
    assert not one.unseal(3, memoryview(bytearray(PAGE)), memoryview(bytearray(PAGE)))


def test_generations_past_16_bits_keep_their_high_bits_and_nonces_stay_unique() -> None:
    seal = Encryption(4, "dev")
    page = os.urandom(PAGE)
    seal._set_generation(2, 0xFFFE)
    seen = set()
    for _ in range(4):  # 0xFFFF, 0x10000, 0x10001, 0x10002: across the 16-bit wrap
        sealed = bytes(seal.seal(2, memoryview(page)))
        assert sealed not in seen
        seen.add(sealed)
        out = memoryview(bytearray(PAGE))
        assert seal.unseal(2, memoryview(bytearray(sealed)), out) and out == page
    assert seal.generation(2) == 0x10002 and seal._gen_high == {2: 1}
    assert seal.generation(3) == 0
    assert seal.nbytes() == 4 * 10 + 100


def test_a_key_past_its_forgery_budget_refuses_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmpager.tiers import seal as seal_module

    monkeypatch.setattr(seal_module, "FORGERY_BUDGET", 3)
    seal = Encryption(4, "dev")
    page = os.urandom(PAGE)
    good = bytes(seal.seal(1, memoryview(page)))
    for _ in range(3):
        assert not seal.unseal(1, memoryview(bytearray(PAGE)), memoryview(bytearray(PAGE)))
    with pytest.raises(DeviceError, match="failed authentications"):
        seal.unseal(1, memoryview(bytearray(good)), memoryview(bytearray(PAGE)))


def test_a_block_whose_generations_are_used_up_refuses_writes() -> None:
    seal = Encryption(2, "dev")
    seal._set_generation(1, (1 << 32) - 1)
    with pytest.raises(DeviceError, match="generations are used up") as info:
        seal.seal(1, memoryview(bytes(PAGE)))
    assert info.value.block == 1
