"""Terminal output of the command line: progress bars with an ETA, notes and tables.

With ``rich`` installed (``pip install 'vmpager[rich]'``) and a terminal on
the other end, progress is drawn by rich's live display and tables are rich
tables. Otherwise the output is plain text:

- on a terminal, one progress line rewritten in place (label, percentage,
  count, rate, ETA);
- on anything else (a pipe, a log file), one line per bar every
  ``interval`` seconds and one when it finishes -- nothing that needs a
  terminal to read;
- tables are aligned columns of plain text.

Nothing here touches the VM. A ``Console`` is used from one thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, TextIO

__all__ = ["Bar", "Console", "format_duration", "have_rich", "render_table"]


def have_rich() -> bool:
    """Whether the optional ``rich`` library can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def format_duration(seconds: float) -> str:
    """``seconds`` as H:MM:SS (or M:SS under an hour); "?" when unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    """Aligned plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(header))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in rows)
    return "\n".join(out) + "\n"


class Bar(Protocol):
    """One progress bar: ``update`` with the amount done so far, ``finish`` once."""

    def update(self, done: int) -> None: ...

    def finish(self) -> None: ...


class _NullBar:
    def update(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


class _PlainBar:
    """A bar drawn as text: in place on a terminal, as occasional lines elsewhere."""

    def __init__(self, console: Console, label: str, total: int) -> None:
        self._console = console
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = self.start
        self._finished = False

    def status(self) -> str:
        elapsed = time.monotonic() - self.start
        frac = min(self.done / self.total, 1.0)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        speed = f"{rate:,.0f}/s" if rate >= 10 else f"{rate * 60:,.1f}/min"
        return (
            f"{self.label}: {frac:4.0%} ({self.done:,}/{self.total:,}), "
            f"{speed}, ETA {format_duration(eta)}"
        )

    def update(self, done: int) -> None:
        self.done = min(done, self.total)
        now = time.monotonic()
        interval = 0.2 if self._console.is_terminal else self._console.interval
        if now - self._last_draw >= interval:
            self._last_draw = now
            self._console._draw(self)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.done = self.total
        elapsed = time.monotonic() - self.start
        self._console._finish(self, f"{self.label}: done, {self.total:,} in {elapsed:.1f} s")


class _RichBar:
    def __init__(self, progress: Any, label: str, total: int) -> None:
        self._progress = progress
        self._total = max(total, 1)
        self._task = progress.add_task(label, total=self._total)

    def update(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def finish(self) -> None:
        self._progress.update(self._task, completed=self._total)
        self._progress.remove_task(self._task)


class Console:
    """Progress bars, notes and tables on ``stream`` (progress and notes) and ``out`` (tables).

    ``fancy``: None picks rich when it is installed and ``stream`` is a
    terminal; False forces plain text; True requires rich. ``quiet``: no
    progress at all (notes and tables still appear). ``interval``: seconds
    between the progress lines written to something that is not a terminal.
    Use as a context manager, or call ``close`` at the end.
    """

    def __init__(
        self,
        stream: TextIO,
        out: TextIO | None = None,
        *,
        fancy: bool | None = None,
        quiet: bool = False,
        interval: float = 10.0,
    ) -> None:
        self.stream = stream
        self.out = out if out is not None else stream
        self.is_terminal = _isatty(stream)
        self.fancy = (have_rich() and self.is_terminal) if fancy is None else fancy
        self.quiet = quiet
        self.interval = interval
        self._progress: Any = None
        self._drawn = False  # a plain in-place line is on the terminal

    def __enter__(self) -> Console:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def bar(self, label: str, total: int) -> Bar:
        """A new progress bar of ``total`` steps (a no-op one when quiet)."""
        if self.quiet:
            return _NullBar()
        if self.fancy:
            return _RichBar(self._rich_progress(), label, total)
        return _PlainBar(self, label, total)

    def note(self, text: str) -> None:
        """A line of text on ``stream``, above any live progress."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
            return
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
        """A table on ``out``: a rich table when fancy and ``out`` is a terminal."""
        if self.fancy and _isatty(self.out):
            from rich.console import Console as RichConsole
            from rich.table import Table

            table = Table(title=title or None, title_justify="left")
            for i, name in enumerate(header):
                table.add_column(name, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            RichConsole(file=self.out).print(table)
            return
        self._clear()
        self.out.write(render_table(header, rows, title))
        self.out.flush()

    def close(self) -> None:
        """Stop the live display (rich) or end the in-place line (plain)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._clear()

    # -- plain drawing ------------------------------------------------------------

    def _draw(self, bar: _PlainBar) -> None:
        if self.is_terminal:
            self.stream.write("\r\x1b[K" + bar.status())
            self._drawn = True
        else:
            self.stream.write(bar.status() + "\n")
        self.stream.flush()

    def _finish(self, bar: _PlainBar, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _rich_progress(self) -> Any:
        if self._progress is None:
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=RichConsole(file=self.stream),
            )
            self._progress.start()
        return self._progress


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
