"""The CLI's one console: results to stdout, diagnostics to stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def human_bytes(n: float) -> str:
    """`1.5 GiB`-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plural(n: int, word: str) -> str:
    """`1 rank`, `4 ranks`."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


@contextmanager
def progress() -> Iterator[Callable[[str, int, int], None]]:
    """An `(phase, done, total)` callback that draws one bar per phase on stderr while the block
    runs, when stderr is a terminal (nothing otherwise, so pipes and logs stay clean)."""
    if not err.is_terminal:
        yield lambda phase, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    with bars:
        yield update
