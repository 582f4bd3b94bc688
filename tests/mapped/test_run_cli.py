"""``vmpager run --mapped``: the standard workload as numpy indexing, with the usual report."""

from __future__ import annotations

import json

import pytest

from vmpager.cli import main
from vmpager.testing.mapped import UNAVAILABLE

pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def test_run_mapped_reports_and_verifies_every_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--mapped", "--size", "4M", "--memory", "1M", "--accesses", "3000", "--json"]
    assert main(argv) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["pattern"] for r in runs] == ["seq", "random", "zipf"]
    for report in runs:
        assert report["mapped"] is True
        assert report["bad_pages"] == 0 and report["verified_pages"] == 1024
        assert report["pages_out"] > 0 and report["pages_in"] > 0  # 4x the budget: it paged
        assert report["client_faults"] >= report["soft_faults"] >= 0
