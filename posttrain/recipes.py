"""`posttrain recipes` and `posttrain objectives`: what is available, one line each."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.table import Table

from posttrain.errors import UserError
from posttrain.progress import console


def recipes_dir(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    here = Path("recipes")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def description(path: Path) -> str:
    """A recipe's first comment line is its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_recipes(directory: Path | None) -> None:
    root = recipes_dir(directory)
    files = sorted(root.rglob("*.yaml"))
    if not files:
        raise UserError(f"no recipes (*.yaml) under {root}")
    table = Table(title=f"recipes in {root}", title_justify="left")
    table.add_column("recipe", style="bold")
    table.add_column("description")
    for path in files:
        table.add_row(str(path.relative_to(root)), description(path))
    console.print(table)


def list_objectives() -> None:
    from posttrain.losses import OBJECTIVES

    table = Table(title="objectives", title_justify="left")
    for column in ("name", "kind", "params (defaults)", "what it is"):
        table.add_column(column)
    for objective in OBJECTIVES.values():
        defaults = objective.Params()
        params = ", ".join(f"{f.name}={getattr(defaults, f.name)}" for f in dataclasses.fields(defaults)) or "-"
        # on-policy: the command, and the sources the loop fetches for it (with default params)
        kind = (f"rl (on-policy; {', '.join(sorted(objective.needs(defaults)))})" if objective.on_policy
                else "train (offline)")
        table.add_row(objective.name, kind, params, objective.summary)
    console.print(table)
