"""Console output: plain progress with an ETA, tables, and rich when asked for."""

from __future__ import annotations

import io

import pytest

from vmpager.console import Console, format_duration, have_rich, render_table


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration() -> None:
    assert format_duration(0) == "0:00"
    assert format_duration(61.4) == "1:01"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"
    assert format_duration(float("inf")) == "?"


def test_plain_progress_in_a_log_writes_lines_with_an_eta() -> None:
    stream = io.StringIO()
    console = Console(stream, fancy=False, interval=0.0)
    bar = console.bar("fill", 200)
    bar.update(50)
    bar.update(100)
    bar.finish()
    bar.finish()  # once only
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("fill:  25% (50/200), ") and "ETA " in lines[0]
    assert lines[1].startswith("fill:  50% (100/200)")
    assert lines[2].startswith("fill: done, 200 in ")
    assert len(lines) == 3
    assert "\r" not in stream.getvalue()


def test_plain_progress_in_a_log_is_rate_limited() -> None:
    stream = io.StringIO()
    console = Console(stream, fancy=False, interval=3600.0)
    bar = console.bar("verify", 10)
    for done in range(11):
        bar.update(done)
    bar.finish()
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]


def test_plain_progress_on_a_terminal_redraws_one_line_and_notes_clear_it() -> None:
    stream = _Terminal()
    console = Console(stream, fancy=False)
    assert console.is_terminal and not console.fancy
    bar = console.bar("seq", 10)
    console.interval = 0.0
    bar._last_draw = -1e9  # type: ignore[attr-defined]  # draw now
    bar.update(5)
    console.note("a note")
    bar.finish()
    text = stream.getvalue()
    assert "\r\x1b[K" + "seq:  50% (5/10)" in text
    assert "\r\x1b[Ka note\n" in text
    assert text.endswith("seq: done, 10 in 0.0 s\n")


def test_quiet_console_draws_no_progress_but_keeps_notes_and_tables() -> None:
    stream = io.StringIO()
    with Console(stream, quiet=True) as console:
        bar = console.bar("fill", 10)
        bar.update(10)
        bar.finish()
        console.note("kept")
        console.table(["a", "b"], [["x", "1"]])
    assert stream.getvalue().splitlines()[0] == "kept"
    assert "fill" not in stream.getvalue()


def test_render_table_aligns_columns() -> None:
    text = render_table(["pattern", "acc/s"], [["seq", "1,000"], ["random", "20"]], "title")
    assert text.splitlines() == [
        "title",
        "pattern  acc/s",
        "-------  -----",
        "seq      1,000",
        "random      20",
    ]


def test_not_a_terminal_means_plain_even_with_rich() -> None:
    assert Console(io.StringIO()).fancy is False


@pytest.mark.skipif(not have_rich(), reason="rich not installed (pip install 'vmpager[rich]')")
def test_rich_progress_and_table_on_a_terminal() -> None:
    stream = _Terminal()
    with Console(stream, fancy=True) as console:
        bar = console.bar("fill", 100)
        bar.update(40)
        console.note("between")
        bar.finish()
        console.table(["pattern", "acc/s"], [["seq", "1,000"]], title="results")
    text = stream.getvalue()
    assert "between" in text and "results" in text and "1,000" in text
