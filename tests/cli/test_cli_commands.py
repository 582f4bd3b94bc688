"""The subcommands on tiny sizes: help with examples, run, swapinfo, bench in plain mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmpager import cli
from vmpager.bench import kernel, paging
from vmpager.cli import main

pytestmark = pytest.mark.timeout(120)

COMMANDS = ["run", "bench", "serve", "stress", "swapinfo"]


# -- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_ends_with_two_or_three_examples(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    tail = text[text.rindex("examples:") :].splitlines()[1:]
    examples = [line for line in tail if line.lstrip().startswith(("vmpager ", "sudo vmpager "))]
    assert 2 <= len(examples) <= 3, tail
    # Nothing but the examples (and, at the top, a pointer to the guide) after them.
    assert all(line.strip() == "" or line in examples or "guide" in line for line in tail)
    if argv != ["--help"]:
        assert all(f"vmpager {argv[0]}" in line for line in examples)


# -- run --------------------------------------------------------------------------------------


def _workload(argv: list[str]) -> tuple[str, int, int, int | None]:
    return cli._run_workload(cli.build_parser().parse_args(["run", *argv]))


def test_bare_run_is_the_quick_workload_and_standard_is_one_flag_away() -> None:
    assert _workload([]) == ("quick workload", 256 << 20, 64 << 20, 125_000)
    standard = ("standard workload", 2 << 30, 512 << 20, None)
    assert _workload(["--standard"]) == standard
    assert _workload(["--size", "2G"]) == standard
    assert _workload(["--size", "1G", "--memory", "100M", "--accesses", "7"]) == (
        "workload",
        1 << 30,
        100 << 20,
        7,
    )


def test_run_reports_and_verifies_every_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--size", "1M", "--memory", "128K", "--accesses", "3000"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for pattern in ("seq", "random", "zipf"):
        assert f"{pattern}:" in out
    assert out.count("all 256 pages hold what they should") == 3
    # The summary table, plain (not a terminal).
    assert "pattern" in out and "accesses/s" in out and out.count(" ok") >= 3
    # Plain progress: one line per finished phase, no terminal control codes.
    assert "fill: done, 256" in captured.err
    assert "\x1b" not in captured.err and "\r" not in captured.err


def test_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--size", "512K", "--memory", "64K", "--pattern", "random", "--json"]
    assert main([*argv, "--accesses", "500"]) == 0
    report = json.loads(capsys.readouterr().out)
    (run,) = report["runs"]
    assert run["pattern"] == "random" and run["accesses"] == 500
    assert run["bad_pages"] == 0 and run["verified_pages"] == 128
    assert run["faults"] > 0


# -- swapinfo ---------------------------------------------------------------------------------


def test_swapinfo_without_swap_says_there_is_nothing_to_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["swapinfo"]) == 0
    out = capsys.readouterr().out
    assert "nothing to list" in out and "--swap PATH:SIZE" in out
    assert main(["swapinfo", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["devices"] == []
    assert "nothing to list" in captured.err


def test_swapinfo_lists_a_configuration_and_leaves_no_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "old"
    existing.write_bytes(b"\0" * (64 << 10))
    new = tmp_path / "new"
    argv = ["swapinfo", "--swap", f"{new}:1M", "--swap", str(existing), "--layout", "stripe"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(new) in out and str(existing) in out
    assert "1024" in out and "64" in out  # 1K-blocks of each
    assert "layout stripe" in out and "total 1.06M" in out.replace("1.1M", "1.06M")
    assert not new.exists(), "a file created for the check was left behind"
    assert existing.stat().st_size == 64 << 10
    assert main([*argv, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["layout"] == "stripe"
    by_name = {d["name"]: d for d in listing["devices"]}
    assert by_name[str(new)]["total"] == 256 and by_name[str(new)]["created_for_the_check"]
    assert by_name[str(existing)]["free"] == 16
    assert not by_name[str(existing)]["created_for_the_check"]
    assert not new.exists()


# -- bench ------------------------------------------------------------------------------------

TINY = ["bench", "--size", "4M", "--memory", "1M", "--accesses", "2000"]


def test_bench_plain_output_on_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TINY, "--kernel", "no"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("pattern"))
    assert "vmpager acc/s" in header
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split()[:1] in (["seq"], ["random"], ["zipf"])
    }
    assert set(rows) == {"seq", "random", "zipf"}
    assert "kernel side skipped: not asked (--kernel no)" in captured.out
    assert "load average" in captured.out
    # Plain progress in a log: one line per run and a runs bar line, no control codes.
    assert captured.err.count("vmpager ") >= 3 and "bench: done, " in captured.err
    assert "\x1b" not in captured.err and "\r" not in captured.err


def test_bench_json_has_the_fields_of_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "bench.json"
    argv = [*TINY, "--kernel", "no", "--patterns", "zipf", "--variants", "loop,batch"]
    assert main([*argv, "--json", "--output", str(output)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(output.read_text()) == report
    cfg = report["config"]
    assert (cfg["mib"], cfg["limit_mib"], cfg["patterns"]) == (4, 1, ["zipf"])
    assert cfg["kernel"] is False and cfg["kernel_skipped_because"]
    medians = report["summary"]["medians"]
    assert set(medians) == {"vmpager", "vmpager-batch"}
    assert medians["vmpager"]["zipf"]["accesses_per_s"] > 0
    assert {r["system"] for r in report["runs"]} == {"vmpager", "vmpager-batch"}
    assert all(r["verified_pages"] == 1024 for r in report["runs"])
    assert report["loadavg_start"] and report["loadavg_end"]
    assert report["swap_left_active"] == []


def test_bench_skips_the_kernel_side_cleanly_when_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """auto: a machine without a compiler runs vmpager alone and says why; nothing is set up."""
    monkeypatch.setattr(kernel, "compiler", lambda: None)
    monkeypatch.setattr(kernel, "active_swaps", lambda: [])
    monkeypatch.setattr(kernel, "detect_memory_cgroup", lambda: ("v2", Path("/nonexistent")))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the kernel side must not be set up")

    monkeypatch.setattr(kernel, "SwapFile", forbidden)
    monkeypatch.setattr(kernel, "MemoryCgroup", forbidden)
    swaps_before = Path("/proc/swaps").read_text() if os.path.exists("/proc/swaps") else ""
    assert main([*TINY, "--patterns", "seq"]) == 0
    out = capsys.readouterr().out
    if os.geteuid() == 0 and all(kernel.shutil.which(t) for t in ("mkswap", "swapon", "swapoff")):
        assert "kernel side skipped: no C compiler" in out and "install gcc" in out
    else:
        assert "kernel side skipped:" in out
    assert "kernel acc/s" not in out
    if swaps_before:
        assert Path("/proc/swaps").read_text() == swaps_before


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"geteuid": 1000}, "needs root"),
        ({"which": None}, "install util-linux"),
        ({"active_swaps": ["/swapfile"]}, "swap is already active (/swapfile)"),
        ({"cgroup": None}, "no memory cgroup controller"),
        ({"compiler": None}, "no C compiler"),
    ],
)
def test_kernel_unavailable_names_what_is_missing(
    patch: dict[str, object], reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel.sys.platform != "linux":
        pytest.skip("Linux only")
    monkeypatch.setattr(kernel.os, "geteuid", lambda: patch.get("geteuid", 0))
    which = patch.get("which", "/usr/sbin/tool")
    monkeypatch.setattr(kernel.shutil, "which", lambda name: which)
    monkeypatch.setattr(kernel, "active_swaps", lambda: patch.get("active_swaps", []))

    def cgroup() -> tuple[str, Path]:
        if "cgroup" in patch:
            raise kernel.KernelBenchError("no memory cgroup controller: test")
        return "v2", Path("/sys/fs/cgroup")

    monkeypatch.setattr(kernel, "detect_memory_cgroup", cgroup)
    monkeypatch.setattr(kernel, "compiler", lambda: patch.get("compiler", "/usr/bin/cc"))
    why = kernel.unavailable()
    assert why is not None and reason in why, why


def test_kernel_available_when_nothing_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel.sys, "platform", "linux")
    monkeypatch.setattr(kernel.os, "geteuid", lambda: 0)
    monkeypatch.setattr(kernel.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(kernel, "active_swaps", lambda: [])
    monkeypatch.setattr(kernel, "detect_memory_cgroup", lambda: ("v2", Path("/sys/fs/cgroup")))
    monkeypatch.setattr(kernel, "compiler", lambda: "/usr/bin/cc")
    assert kernel.unavailable() is None


def test_memory_cgroup_restores_the_controller_it_enabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cgroup v2: memory enabled in the parent for the run is disabled again; the cgroup goes."""
    control = tmp_path / "cgroup.subtree_control"
    control.write_text("cpu io\n")
    monkeypatch.setattr(kernel, "detect_memory_cgroup", lambda: ("v2", tmp_path))
    cgroup = kernel.MemoryCgroup(64)
    with cgroup:
        assert control.read_text() == "+memory"
        assert (cgroup.path / "memory.max").read_text() == str(64 << 20)
        # On cgroupfs the control files go with the directory; here they are plain files.
        for control_file in cgroup.path.iterdir():
            control_file.unlink()
    assert not cgroup.path.exists()
    assert control.read_text() == "-memory"


def test_memory_cgroup_leaves_an_enabled_controller_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = tmp_path / "cgroup.subtree_control"
    control.write_text("cpu memory\n")
    monkeypatch.setattr(kernel, "detect_memory_cgroup", lambda: ("v2", tmp_path))
    with kernel.MemoryCgroup(None) as cgroup:
        assert cgroup.path.is_dir()
    assert not cgroup.path.exists()
    assert control.read_text() == "cpu memory\n"


def test_compile_failure_is_a_kernel_bench_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "compiler", lambda: "/bin/false")
    with pytest.raises(kernel.KernelBenchError, match=r"could not build kworkload\.c"):
        kernel.compile_kworkload(tmp_path)


def test_kworkload_source_ships_with_the_package() -> None:
    assert kernel.SOURCE.is_file()
    assert "MADV_WILLNEED" in kernel.SOURCE.read_text()


def test_ratio_rows_of_a_report_with_the_kernel() -> None:
    def run(system: str, rep: int, rate: float) -> dict[str, object]:
        return {"system": system, "pattern": "seq", "rep": rep, "accesses_per_s": rate}

    runs = [run("vmpager", 0, 30.0), run("kernel", 0, 20.0), run("vmpager", 1, 10.0)]
    runs.append(run("kernel", 1, 10.0))
    report = {"config": {"patterns": ["seq"]}, "summary": paging.summarize(runs)}
    header, rows = paging.ratio_rows(report)
    assert header == ["pattern", "vmpager acc/s", "kernel acc/s", "vmpager / kernel"]
    # Medians of 30, 10 and 20, 10; the ratio is the median of the per-rep ratios 1.5, 1.0.
    assert rows == [["seq", "20", "15", "1.25"]]


@pytest.mark.skipif(kernel.compiler() is None, reason="no C compiler (install gcc)")
@pytest.mark.parametrize("pattern", ["seq", "zipf"])
def test_shipped_kworkload_makes_the_accesses_vmpager_predicts(
    pattern: str, tmp_path: Path
) -> None:
    """The C program, compiled from the package, run plainly (no cgroup, no swap)."""
    import subprocess

    from vmpager.workload import Workload

    binary = kernel.compile_kworkload(tmp_path)
    workload = Workload(1024, pattern, accesses=5000)  # type: ignore[arg-type]
    index_file = tmp_path / "indices.u32"
    workload.indices.astype("<u4").tofile(index_file)
    argv = [str(binary), "--mib", "4", "--index-file", str(index_file)]
    argv += ["--seed", "42", "--fill-offset", str(workload.index_draws)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["accesses"] == 5000
    assert kernel._verify(workload, result) == []
    result["checksum"] += 1
    assert kernel._verify(workload, result), "a wrong checksum must be noticed"


@pytest.mark.skipif(not paging.have_matplotlib(), reason="pip install 'vmpager[plot]'")
def test_bench_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "bench.png"
    argv = [*TINY, "--kernel", "no", "--patterns", "seq", "--plot", str(target)]
    assert main(argv) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {target}" in capsys.readouterr().out
