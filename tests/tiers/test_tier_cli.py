"""The tier options of the command line: run, swapinfo, scrub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmpager.cli import main


def test_scrub_verifies_every_swapped_page(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["scrub", "--size", "4M", "--memory", "1M", "--compress", "lz4", "--encrypt"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 corrupt, 0 pages read back wrong" in out
    assert "seal AES-256-GCM" in out and "lz4 pool" in out


def test_scrub_json_and_refusal_without_integrity(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scrub", "--size", "2M", "--memory", "512K", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked_pages"] > 300 and report["corrupt"] == []
    assert report["tiers"]["integrity"] is True
    with pytest.raises(SystemExit) as info:
        main(["scrub", "--size", "2M", "--memory", "512K", "--no-integrity"])
    assert info.value.code == 2
    assert "scrub needs integrity checks" in capsys.readouterr().err


def test_run_reports_the_tiers(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--size", "4M", "--memory", "1M", "--pattern", "random"]
    assert main([*argv, "--accesses", "2000", "--compress", "zstd", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["runs"][0]
    tiers = report["tiers"]
    # The standard content is incompressible: every page is a reject, stored on swap.
    assert tiers["compress"] == "zstd" and tiers["rejects"] > 0 and tiers["corrupt_pages"] == 0
    assert main([*argv, "--accesses", "2000"]) == 0
    assert "tiers: seal xxh3-64" in capsys.readouterr().out


def test_swapinfo_shows_the_tiers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    swap = f"{tmp_path / 'swap'}:4M"
    assert main(["swapinfo", "--swap", swap, "--compress", "lz4", "--compress-pool", "1M"]) == 0
    out = capsys.readouterr().out
    assert "tiers: seal xxh3-64, 0 corrupt pages; lz4 pool" in out


def test_a_bad_pool_size_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        main(["swapinfo", "--swap", f"{tmp_path / 'swap'}:4M", "--compress-pool", "1M"])
    assert "compress_pool needs compress" in capsys.readouterr().err
