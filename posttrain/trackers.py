"""Experiment trackers: the recipe's `report_to: [tensorboard, wandb, trackio]` (HF's naming;
`none` or an empty list: no tracker) receives a copy of every row written to metrics.jsonl, which
stays the record `posttrain report` reads. Each tracker is an optional extra
(`pip install 'posttrain[tensorboard]'`, `[wandb]`, `[trackio]`); a missing one is refused with one
line before anything runs.

    tensorboard  event files in <run>/tensorboard (scalars named <prefix>/<key>)
    wandb        project $WANDB_PROJECT (default "posttrain"), files under <run>; offline with
                 WANDB_MODE=offline
    trackio      project $TRACKIO_PROJECT (default "posttrain"), stored where trackio keeps its
                 local database

Only numeric values are sent (strings and lists stay in metrics.jsonl). Only the main process
reports.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path

from posttrain.errors import UserError

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker → module it needs


def chosen(report_to: list[str]) -> list[str]:
    return [name for name in report_to if name != "none"]


def check_installed(report_to: list[str], where: str | None = None) -> None:
    """One line for the first tracker whose package is missing (before the run starts)."""
    for name in chosen(report_to):
        if importlib.util.find_spec(EXTRAS[name]) is None:
            raise UserError(f": {name} is not installed; pip install 'posttrain[{name}]' (or pip install "
                            f"{EXTRAS[name]})", key="report_to", file=where)


def numeric(row: dict) -> dict[str, float]:
    """The row's finite-or-not numbers (bools and strings left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def open_trackers(report_to: list[str], run_dir: Path, run_name: str, config: dict,
                  prefix: str = "train") -> Callable[[dict], None] | None:
    """A function that sends one metrics row (with its "step") to every chosen tracker, or None
    when there is none. The trackers are closed when the process exits."""
    senders = [_OPENERS[name](run_dir, run_name, config, prefix) for name in chosen(report_to)]
    if not senders:
        return None

    def send(row: dict) -> None:
        step = int(row.get("step", 0))
        values = numeric(row)
        for sender in senders:
            sender(values, step)

    return send


def _tensorboard(run_dir: Path, run_name: str, config: dict, prefix: str):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    atexit.register(writer.close)

    def send(values, step):
        for key, value in values.items():
            if math.isfinite(value):  # TensorBoard plots NaN as a gap anyway; keep event files clean
                writer.add_scalar(f"{prefix}/{key}", value, step)
        writer.flush()  # a killed run still has everything up to its last row

    return send


def _wandb(run_dir: Path, run_name: str, config: dict, prefix: str):
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), name=run_name, dir=str(run_dir),
                     config=config, resume="allow")
    atexit.register(run.finish)
    return lambda values, step: run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)


def _trackio(run_dir: Path, run_name: str, config: dict, prefix: str):
    import trackio

    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "posttrain"), name=run_name, config=config,
                 resume="allow")
    atexit.register(trackio.finish)
    return lambda values, step: trackio.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)


_OPENERS = {"tensorboard": _tensorboard, "wandb": _wandb, "trackio": _trackio}


def report_eval(report_to: list[str], out: Path, model: str | None, results: dict) -> None:
    """An eval's metrics (eval/<benchmark>/<metric>) to the trackers, at the step of the evaluated
    checkpoint (runs/<name>/final or checkpoints/step-N: N; another model: 0)."""
    if not chosen(report_to):
        return
    row = {f"{name}/{metric}": value for name, result in results["benchmarks"].items()
           for metric, value in result["metrics"].items()}
    row.update({f"macro/{k}": v for k, v in results.get("macro_average", {}).items()})
    checkpoint = Path(model).resolve().name if model else ""
    step = int(checkpoint[5:]) if checkpoint.startswith("step-") and checkpoint[5:].isdigit() else 0
    send = open_trackers(report_to, out, f"eval-{out.parent.name}-{out.name}", results["config"], prefix="eval")
    send({**row, "step": step})
