"""How a long job (training, a simulation) shows its progress: rich's bar in a terminal, and elsewhere (a log, a
pipe, a dumb terminal: `make demo > log`, CI) one plain line per step as it starts. There rich draws nothing of a
bar while it runs, so a job of several minutes printed nothing at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, ProgressColumn, TaskID

__all__ = ["Steps", "shown_steps"]


class Steps:
    """A job's steps, drawn by ``progress`` (a terminal) or said one plain line each on ``console`` (elsewhere);
    neither when both are None (progress off)."""

    def __init__(
        self,
        name: str,
        steps: int,
        progress: Progress | None = None,
        console: Console | None = None,
        total: float | None = None,
        first: str = "",
    ) -> None:
        self.name = name
        self.steps = steps
        self.progress = progress
        self.task: TaskID | None = None
        if progress is not None:
            self.task = progress.add_task(first, total=steps if total is None else total)
        self.console = console
        self.started = 0

    def start(self, step: str) -> None:
        """Step ``step`` begins: the bar's description, or a line ``<name> N/M: <step>`` (``<name>: <step>`` for a
        job of one step)."""
        self.started += 1
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=step)
        elif self.console is not None:
            count = f" {self.started}/{self.steps}" if self.steps > 1 else ""
            self.console.print(f"{self.name}{count}: {step}", highlight=False)

    def done(self, amount: float = 1) -> None:
        """Move the bar on by ``amount`` (a step, or the job's own units: orders simulated)."""
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, amount)


@contextmanager
def shown_steps(
    console: Console,
    show: bool,
    name: str,
    steps: int,
    columns: tuple[ProgressColumn, ...],
    *,
    total: float | None = None,
    transient: bool = True,
    first: str = "",
) -> Iterator[Steps]:
    """``Steps`` of a job of ``steps`` steps shown on ``console``: a bar of ``columns`` over ``total`` (default: the
    steps), described as ``first`` until a step starts, in an interactive terminal; plain lines elsewhere; nothing
    when ``show`` is false."""
    # Into a file, a pipe or a dumb terminal rich draws nothing of a live bar but, at its end, a blank line (a
    # transient one) or its last state: there each step is a line of its own instead.
    if not show or not console.is_interactive:
        yield Steps(name, steps, console=console if show else None)
        return
    progress = Progress(*columns, console=console, transient=transient)
    with progress:
        yield Steps(name, steps, progress, total=total, first=first)
