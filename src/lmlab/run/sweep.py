"""Hydra callback that ranks the runs of a multirun by the optimized metric."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lmlab")


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's ``metrics.json`` under the sweep folder, best first (failed runs last)."""
    runs = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        record["run_dir"] = str(path.parent)
        runs.append(record)
    sign = -1.0 if runs and runs[0].get("mode") == "max" else 1.0

    def rank_key(run: dict[str, Any]) -> float:
        value = run.get("value")
        return math.inf if value is None or math.isnan(value) else sign * value

    return sorted(runs, key=rank_key)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` in the sweep folder and print a ranked table."""
    runs = collect_runs(sweep_dir)
    if not runs:
        log.warning("No finished runs with metrics.json under %s", sweep_dir)
        return runs
    metric = runs[0].get("optimized_metric") or "value"
    metric_keys = sorted({k for r in runs for k in r.get("metrics", {}) if k.startswith(("val/", "test/"))})
    header = ["rank", "overrides", metric, *[k for k in metric_keys if k != metric], "run_dir"]
    rows = []
    for rank, run in enumerate(runs, start=1):
        values = run.get("metrics", {})
        rows.append(
            [
                rank,
                " ".join(run.get("overrides", [])),
                run.get("value"),
                *[values.get(k) for k in metric_keys if k != metric],
                run["run_dir"],
            ]
        )
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    _print_table(header, rows, title=f"sweep ranked by {metric} ({runs[0].get('mode', 'min')})")
    return runs


def _print_table(header: list[str], rows: list[list[Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in header[:-1]:
        table.add_column(name)
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row[:-1]])
    Console().print(table)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        write_summary(sweep_dir)
        log.info("Sweep summary written to %s", sweep_dir / "summary.csv")
