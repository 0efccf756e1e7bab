"""Progress bars and end-of-run tables (rich). Only the main process prints."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class StepProgress:
    """A bar over optimizer steps showing the latest loss and throughput.

    On a terminal it is a live rich bar; in a log (CI, nohup) it prints a line every ~10%.
    """

    def __init__(self, title: str, total: int, start: int, enabled: bool = True):
        self.title, self.total, self.start, self.enabled = title, total, start, enabled
        self.live = console.is_terminal
        self.last_print = start
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not (enabled and self.live),
        )
        self.task = self.progress.add_task(title, total=total, completed=start, loss="-", speed="")
        self.started = time.time()

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, step: int, row: dict, speed_key: str = "tokens_per_s", speed_unit: str = "tok/s") -> None:
        loss = f"{row['loss']:.4f}" if "loss" in row else "-"
        speed = f"{row[speed_key]:,.0f} {speed_unit}" if speed_key in row else ""
        self.progress.update(self.task, completed=step, loss=loss, speed=speed)
        if self.enabled and not self.live and (step - self.last_print >= max(1, self.total // 10) or step == self.total):
            self.last_print = step
            console.print(f"{self.title}: step {step}/{self.total}  loss {loss}  {speed}  "
                          f"({time.time() - self.started:.0f}s)", highlight=False)


def summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
