"""Tests of the standard paging workload generator (vmpager.workload).

Known answers were produced by two C programs compiled with gcc -O2 -lm on the
standard machine (glibc's pow):

* a small dump program using exactly the C reference's generator and sequence
  code (the reference workload.c of the shared benchmark tools), printing for
  ``(npages, pattern, seed[, accesses])``: the first 12 indices, the last one,
  ``sum`` = sum of the indices mod 2**64, ``wsum`` = sum of (i + 1) * index[i]
  mod 2**64, the total zipf weight H (printed with %.17g), and words 1, 2 and
  511 of a few pages after the fill (the fill drawing 512 words per page after
  the index draw, then setting word 0 to the page number);
* the reference workload.c itself, whose ``checksum=`` output is the sum of the
  words read during the access phase (``--mib 2048`` and ``--mib 1 --accesses 5000``).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpager.errors import InvariantViolation
from vmpager.workload import (
    SplitMix64,
    Workload,
    _sum_of_reads,
    access_checksum,
    expected_word0,
    index_sequence,
    splitmix64_stream,
    stream_draws,
    zipf_cdf,
)

U64 = (1 << 64) - 1
STANDARD_NPAGES = 524288


def _sums(indices: np.ndarray) -> tuple[int, int]:
    values = indices.astype(np.uint64)
    weights = np.arange(1, len(values) + 1, dtype=np.uint64)
    return int(values.sum(dtype=np.uint64)), int((values * weights).sum(dtype=np.uint64))


# (npages, pattern, seed, accesses) -> (K, first 12, last, sum, wsum)
SEQUENCE_ANSWERS: dict[tuple[int, str, int, int | None], tuple[Any, ...]] = {
    (524288, "seq", 42, None): (
        1572864, list(range(12)), 524287, 412316073984, 360287557872254976,
    ),
    (524288, "random", 42, None): (
        1000000,
        [224917, 454915, 499538, 189332, 9202, 56070, 486749, 405412, 359893, 489390, 203199,
         413886],
        294145, 261919273107, 131033611396063589,
    ),
    (524288, "zipf", 42, None): (
        1000000,
        [316179, 352373, 17086, 463854, 0, 57807, 111692, 251294, 111481, 5270, 180458, 75199],
        262427, 261012386469, 130488235791015563,
    ),
    (64, "seq", 42, None): (192, list(range(12)), 63, 6048, 649152),
    (64, "random", 42, None): (
        1000000, [21, 3, 18, 20, 50, 6, 29, 36, 21, 46, 63, 62], 1, 31512723, 15753497469541,
    ),
    (64, "zipf", 42, None): (
        1000000, [50, 0, 49, 34, 0, 2, 49, 24, 34, 42, 0, 53], 17, 26080992, 13044099989142,
    ),
    (1000, "random", 7, 5000): (
        5000, [487, 804, 346, 203, 674, 305, 798, 182, 985, 425, 83, 516], 237, 2493954,
        6194189873,
    ),
}  # fmt: skip


@pytest.mark.parametrize("key", list(SEQUENCE_ANSWERS), ids=str)
def test_sequences_match_the_c_reference(key: tuple[int, str, int, int | None]) -> None:
    npages, pattern, seed, accesses = key
    naccesses, first, last, total, weighted = SEQUENCE_ANSWERS[key]
    indices = index_sequence(pattern, npages, seed=seed, accesses=accesses)  # type: ignore[arg-type]
    assert indices.dtype == np.int64
    assert len(indices) == naccesses
    assert indices[:12].tolist() == first
    assert int(indices[-1]) == last
    assert _sums(indices) == (total, weighted)


# (npages, pattern, seed, accesses) -> {page: (word 1, word 2, word 511)}
FILL_ANSWERS: dict[tuple[int, str, int, int | None], dict[int, tuple[int, int, int]]] = {
    (524288, "seq", 42, None): {
        0: (2949826092126892291, 5139283748462763858, 8157692503497362878),
        1: (5615906502368728138, 14392539439406769308, 12474830977920898953),
        524287: (14421771182002530236, 17991112155279341132, 7178322922380423568),
    },
    # random and zipf both draw 1,000,000 indices first, so their fills coincide.
    (524288, "zipf", 42, None): {
        0: (18301529900831776837, 13276240773094526182, 18219433101286801941),
        1: (18363851820396015888, 17464093498545179282, 12080864307366788346),
        524287: (8065822989380360715, 3971793772531268268, 9562909436357840079),
    },
    (64, "seq", 42, None): {
        63: (12717220999483890050, 16839879972312675133, 2751920307612689712),
    },
    (64, "random", 42, None): {
        63: (12067742038719269011, 4269901735866507314, 11512704233563415005),
    },
    (1000, "random", 7, 5000): {
        0: (8062932441284525380, 17798745298091187372, 2230459735967449287),
        1: (4724385896169302725, 9337013103767704218, 8132115010513989353),
        999: (7887666520313079822, 8116675348355062408, 12625734216605584121),
    },
}


@pytest.mark.parametrize("key", list(FILL_ANSWERS), ids=str)
def test_fill_words_match_the_c_reference(key: tuple[int, str, int, int | None]) -> None:
    npages, pattern, seed, accesses = key
    workload = Workload(npages, pattern, seed=seed, accesses=accesses)  # type: ignore[arg-type]
    for page, (word1, word2, word511) in FILL_ANSWERS[key].items():
        words = workload.fill_pages(page, 1)
        assert words.shape == (1, 512)
        assert words.dtype == np.uint64
        assert words[0, :3].tolist() == [page, word1, word2]
        assert int(words[0, 511]) == word511


def test_zipf_total_weight_matches_the_c_reference() -> None:
    assert float(zipf_cdf(STANDARD_NPAGES)[-1]) == 14.652859697030831
    assert float(zipf_cdf(64)[-1]) == 4.8311863737188219


# (npages, pattern, accesses) -> checksum= printed by the reference workload.c, seed 42
ACCESS_CHECKSUMS = {
    (524288, "seq", None): 412317646848,
    (524288, "random", None): 261920228231,
    (524288, "zipf", None): 264896312518,
    (256, "seq", 5000): 675700,
    (256, "random", 5000): 684912,
    (256, "zipf", 5000): 1063377,
}


@pytest.mark.parametrize("key", list(ACCESS_CHECKSUMS), ids=str)
def test_access_checksum_matches_the_c_reference(key: tuple[int, str, int | None]) -> None:
    npages, pattern, accesses = key
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    assert workload.access_checksum() == ACCESS_CHECKSUMS[key]


# ---- generator ---------------------------------------------------------------------------


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    seed=st.integers(0, U64),
    start=st.integers(0, 1 << 40) | st.integers(U64 - 100, U64 - 20),
    count=st.integers(0, 20),
)
def test_vectorised_stream_equals_scalar_generator(seed: int, start: int, count: int) -> None:
    # The scalar generator cannot skip ahead, so start it from the state it
    # would have after `start` draws; the first rows check skipping itself.
    scalar = SplitMix64((seed + start * 0x9E3779B97F4A7C15) & U64)
    expected = [scalar.next() for _ in range(count)]
    assert splitmix64_stream(seed, start, count).tolist() == expected


def test_scalar_generator_draws_from_the_start() -> None:
    scalar = SplitMix64(42)
    drawn = [scalar.next() for _ in range(1000)]
    assert splitmix64_stream(42, 0, 1000).tolist() == drawn
    assert splitmix64_stream(42, 990, 10).tolist() == drawn[990:]
    # First output of splitmix64 seeded 0, a widely published test vector.
    assert SplitMix64(0).next() == 0xE220A8397B1DCDAF


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    npages=st.integers(1, 300),
    seed=st.integers(0, U64),
    accesses=st.integers(0, 200),
)
def test_random_sequence_equals_scalar_model(npages: int, seed: int, accesses: int) -> None:
    scalar = SplitMix64(seed)
    expected = [scalar.next() % npages for _ in range(accesses)]
    assert index_sequence("random", npages, seed=seed, accesses=accesses).tolist() == expected


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    log2_npages=st.integers(0, 10),
    seed=st.integers(0, U64),
    accesses=st.integers(0, 200),
)
def test_zipf_sequence_equals_scalar_model(log2_npages: int, seed: int, accesses: int) -> None:
    npages = 1 << log2_npages
    cdf: list[float] = []
    total = 0.0
    for rank in range(1, npages + 1):
        total += 1.0 / math.pow(rank, 0.99)
        cdf.append(total)
    scalar = SplitMix64(seed)
    expected = []
    for _ in range(accesses):
        uniform = (scalar.next() >> 11) * (1.0 / 9007199254740992.0) * total
        rank = min(bisect.bisect_left(cdf, uniform), npages - 1)
        expected.append((rank * 0x9E3779B1) % npages)
    assert index_sequence("zipf", npages, seed=seed, accesses=accesses).tolist() == expected


def test_zipf_is_skewed_towards_low_ranks() -> None:
    npages = 1024
    indices = index_sequence("zipf", npages, accesses=100_000)
    counts = np.bincount(indices, minlength=npages)
    hottest = [(rank * 0x9E3779B1) % npages for rank in range(4)]
    assert counts.argmax() == hottest[0]
    # Rank 0's share is 1 / H, about 1 / 7.1 for 1024 pages.
    assert abs(counts[hottest[0]] / len(indices) - 1.0 / float(zipf_cdf(npages)[-1])) < 0.01
    assert counts[hottest].tolist() == sorted(counts[hottest].tolist(), reverse=True)


def test_seq_sequence_and_default_lengths() -> None:
    assert index_sequence("seq", 5, accesses=12).tolist() == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert len(index_sequence("seq", 7)) == 21
    assert len(index_sequence("random", 7)) == 1_000_000
    assert stream_draws("seq", 21) == 0
    assert stream_draws("random", 21) == 21
    assert stream_draws("zipf", 5) == 5


# ---- workload: fill and expected results -------------------------------------------------


@pytest.mark.parametrize("pattern", ["seq", "random", "zipf"])
def test_fill_continues_the_stream_after_the_index_draw(pattern: str) -> None:
    workload = Workload(16, pattern, seed=3, accesses=50, page_size=64)  # type: ignore[arg-type]
    draws = 0 if pattern == "seq" else 50
    assert workload.index_draws == draws
    pages = workload.fill_pages(0, 16)
    stream = splitmix64_stream(3, draws, 16 * 8).reshape(16, 8)
    assert np.array_equal(pages[:, 1:], stream[:, 1:])
    assert pages[:, 0].tolist() == list(range(16))
    # Any window equals the matching rows of the whole.
    assert np.array_equal(workload.fill_pages(5, 7), pages[5:12])
    assert workload.fill_pages(16, 0).shape == (0, 8)


def test_sparse_fill_writes_only_word0() -> None:
    workload = Workload(8, "random", accesses=10, content="sparse")
    pages = workload.fill_pages(2, 3)
    assert pages.shape == (3, 512)
    assert pages[:, 0].tolist() == [2, 3, 4]
    assert not pages[:, 1:].any()


def _simulate(workload: Workload, done: int) -> tuple[np.ndarray, int]:
    """Play the access phase on a plain array of word 0s, the way the C loop does."""
    word0 = list(range(workload.npages))
    total = 0
    for page in workload.indices[:done].tolist():
        total = (total + word0[page]) & U64
        word0[page] += 1
    return np.array(word0, dtype=np.uint64), total


@pytest.mark.parametrize("pattern", ["seq", "random", "zipf"])
def test_expected_word0_and_checksum_equal_simulation(pattern: str) -> None:
    workload = Workload(32, pattern, seed=9, accesses=3000)  # type: ignore[arg-type]
    for done in (0, 1, 1234, 3000):
        word0, total = _simulate(workload, done)
        assert np.array_equal(workload.expected_word0(done), word0)
        assert workload.access_checksum(done) == total
    assert np.array_equal(workload.expected_word0(), _simulate(workload, 3000)[0])


def test_checksum_wraps_mod_2_64() -> None:
    # Page 3 read 2**33 + 1 times: c * (c - 1) / 2 exceeds 2**64; page 4095 read
    # 2**64 - 6 times overflows every product. The C sum wraps, so must this.
    count = (1 << 33) + 1
    counts = np.zeros(1 << 12, dtype=np.uint64)
    counts[3] = count
    counts[4095] = U64 - 5
    expected = (3 * count + count * (count - 1) // 2) & U64
    expected = (expected + 4095 * (U64 - 5) + (U64 - 5) * (U64 - 6) // 2) & U64
    assert _sum_of_reads(counts) == expected


def test_module_level_expected_word0() -> None:
    indices = np.array([1, 1, 3], dtype=np.int64)
    assert expected_word0(indices, 4).tolist() == [0, 3, 2, 4]
    assert access_checksum(indices, 4) == 1 + 2 + 3


# ---- validation and invariants -------------------------------------------------------------


def test_bad_arguments_are_rejected_with_their_name() -> None:
    with pytest.raises(ValueError, match="pattern"):
        index_sequence("zigzag", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="power of two"):
        index_sequence("zipf", 12)
    with pytest.raises(ValueError, match="npages"):
        index_sequence("seq", 0)
    with pytest.raises(ValueError, match="accesses"):
        index_sequence("random", 8, accesses=-1)
    with pytest.raises(TypeError, match="seed"):
        index_sequence("random", 8, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        splitmix64_stream(-1, 0, 1)
    with pytest.raises(ValueError, match="count"):
        splitmix64_stream(0, U64, 2)
    with pytest.raises(ValueError, match="content"):
        Workload(8, "seq", content="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page_size"):
        Workload(8, "seq", page_size=100)
    workload = Workload(8, "seq")
    with pytest.raises(ValueError, match="count"):
        workload.fill_pages(4, 5)
    with pytest.raises(ValueError, match="accesses_done"):
        workload.expected_word0(25)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\]"):
        expected_word0(np.array([4]), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        access_checksum(np.array([0.5]), 4)


def test_workload_is_immutable_and_checks_itself() -> None:
    workload = Workload(64, "zipf", accesses=100)
    workload.check()
    assert workload.accesses == workload.naccesses == 100
    assert workload.size_bytes == 64 * 4096
    with pytest.raises(ValueError, match="read-only"):
        workload.indices[0] = 1
    with pytest.raises(AttributeError):
        workload.npages = 3  # type: ignore[misc]
    broken = np.array([0, 64], dtype=np.int64)
    broken.setflags(write=False)
    object.__setattr__(workload, "indices", broken)
    with pytest.raises(InvariantViolation, match="outside"):
        workload.check()


def test_check_catches_a_wrong_seq_order() -> None:
    workload = Workload(4, "seq", accesses=4)
    workload.check()
    swapped = np.array([1, 0, 2, 3], dtype=np.int64)
    swapped.setflags(write=False)
    object.__setattr__(workload, "indices", swapped)
    with pytest.raises(InvariantViolation, match="i mod npages"):
        workload.check()
