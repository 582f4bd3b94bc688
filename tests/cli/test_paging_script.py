"""benchmarks/paging.py calls vmpager.bench; its JSON still renders with paging_report.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(120)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paging_script_keeps_its_options_and_report(capsys: pytest.CaptureFixture[str]) -> None:
    paging = _load("paging")
    argv = ["--mib", "4", "--limit-mib", "1", "--reps", "2", "--patterns", "seq,zipf"]
    argv += ["--kernel", "no", "--no-disk", "--no-hit", "--accesses", "1000"]
    assert paging.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"].endswith("(benchmarks/paging.py)")
    assert report["config"]["reps"] == 2 and report["config"]["mib"] == 4
    assert len(report["runs"]) == 4
    assert report["summary"]["medians"]["vmpager"]["seq"]["reps"] == 2
    text = _load("paging_report").render(report)
    assert "| vmpager | seq |" in text and "| vmpager | zipf |" in text


def test_paging_script_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    paging = _load("paging")
    with pytest.raises(SystemExit) as info:
        paging.main(["--patterns", "seq,nope"])
    assert info.value.code == 2
    assert "nope" in capsys.readouterr().err
