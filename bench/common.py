"""Shared pieces of the benchmarks: timing, percentiles, tables, and the results file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `senab serve` on 127.0.0.1:`port` with extra `env`; return once /readyz returns 200."""
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                               env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server not ready after 300 s; see {log_path}")


def stop_server(process: subprocess.Popen, redis_url: str, prefix: str) -> None:
    """Stop a server from `start_server` and delete the Redis keys it wrote under `prefix`."""
    import redis

    process.send_signal(signal.SIGTERM)
    process.wait(60)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()
