"""Shared pieces of the benchmarks: timing, percentiles, tables, and the results file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def hardware() -> str:
    from senab.evaluate import hardware_description

    return hardware_description()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_format(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * width for width in widths))


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def check(name: str, value: float, target: float, *, at_most: bool = False) -> dict[str, object]:
    """Return one target row: met when value >= target (or <= with `at_most`)."""
    met = value <= target if at_most else value >= target
    return {"measure": name, "value": value, "target": ("<= " if at_most else ">= ") + f"{target:g}",
            "met": bool(met)}


def save(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"hardware": hardware(), **payload}, indent=1) + "\n")
    return path


def print_targets(rows: list[dict[str, object]]) -> bool:
    print_table("targets", ["measure", "value", "target", "status"],
                [[r["measure"], r["value"], r["target"], "met" if r["met"] else "MISSED"] for r in rows])
    return all(r["met"] for r in rows)
