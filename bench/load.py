"""Hold N concurrent streaming clients on the server and count lost or duplicated turns.

Starts `senab serve` on a free loopback port (state in the Redis at --redis-url under a
private prefix, deleted afterwards), or uses --url. Each client owns one session and sends
turns back to back for --seconds: a new user message each time, streamed, with an
Idempotency-Key. A request that fails (an HTTP error, an error event, a dropped
connection) is retried once with the same key, as an SDK would. At the end every session's
turn counter and trajectory are compared with the turns its client saw succeed: a turn
counted by the server but not by the client is a duplicate, one seen but not counted is lost.
Prints errors by status, latency percentiles, and exits 1 if any turn was lost or duplicated.

Usage: python bench/load.py [--clients 50] [--seconds 60] [--tokens 16] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, hardware, percentile, print_table, save, start_server, stop_server  # noqa: E402


@dataclass
class Client:
    session_id: str
    succeeded: int = 0
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


async def one_turn(http: httpx.AsyncClient, model: str, client: Client, content: str, key: str,
                   tokens: int) -> bool:
    """Send one streamed turn; return True if it finished, recording latency or the error."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "stream": True}
    headers = {"X-Session-Id": client.session_id, "Idempotency-Key": key}
    sent = time.perf_counter()
    first = None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                client.errors[str(response.status_code)] += 1
                return False
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    client.errors[f"stream {chunk['error'].get('code')}"] += 1
                    return False
                choice = (chunk.get("choices") or [{}])[0]
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter()
                finished = finished or choice.get("finish_reason") is not None
            if not finished:
                client.errors["stream ended early"] += 1
                return False
    except httpx.HTTPError as exc:
        client.errors[type(exc).__name__] += 1
        return False
    end = time.perf_counter()
    client.latencies.append(end - sent)
    client.first_token.append((first or end) - sent)
    return True


async def run_client(http: httpx.AsyncClient, model: str, client: Client, deadline: float, tokens: int) -> None:
    turn = 0
    while time.monotonic() < deadline:
        turn += 1
        content = f"Message {turn}: tell me one fact about the number {turn}."
        key = uuid.uuid4().hex
        if await one_turn(http, model, client, content, key, tokens):
            client.succeeded += 1
        elif await one_turn(http, model, client, content, key, tokens):  # a retry with the same key
            client.succeeded += 1
        else:
            # The turn's outcome is unknown to this client: stop here so the count stays exact.
            client.errors["given up"] += 1
            return


async def audit(http: httpx.AsyncClient, clients: list[Client]) -> tuple[int, int, int]:
    """Return (lost, duplicated, sessions whose trajectory is not 1..n)."""
    lost = duplicated = bad_trajectories = 0
    for client in clients:
        state = await http.get(f"/sessions/{client.session_id}/state")
        turn = state.json()["turn"] if state.status_code == 200 else 0
        points = await http.get(f"/sessions/{client.session_id}/trajectory")
        turns = [p["turn"] for p in points.json()["points"]] if points.status_code == 200 else []
        lost += max(client.succeeded - turn, 0)
        duplicated += max(turn - client.succeeded, 0)
        bad_trajectories += turns != list(range(1, turn + 1))
    return lost, duplicated, bad_trajectories


async def run(url: str, model: str, clients: int, seconds: float, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        states = [Client(session_id=f"load-{uuid.uuid4().hex}") for _ in range(clients)]
        started = time.monotonic()
        await asyncio.gather(*(run_client(http, model, c, started + seconds, tokens) for c in states))
        elapsed = time.monotonic() - started
        lost, duplicated, bad = await audit(http, states)
        for client in states:
            await http.delete(f"/sessions/{client.session_id}")
    latencies = [x for c in states for x in c.latencies]
    first = [x for c in states for x in c.first_token]
    errors = sum((c.errors for c in states), Counter())
    return {"clients": clients, "seconds": elapsed, "turns": sum(c.succeeded for c in states),
            "errors": dict(errors), "latency_p50": percentile(latencies, 50),
            "latency_p99": percentile(latencies, 99), "ttft_p50": percentile(first, 50),
            "ttft_p99": percentile(first, 99), "lost": lost, "duplicated": duplicated,
            "bad_trajectories": bad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent streaming clients (default 50)")
    parser.add_argument("--seconds", type=float, default=60, help="how long clients keep sending (default 60)")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens per turn (default 16)")
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="model to request (default the served model's +senab name)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)

    server = None
    prefix = f"senab-load-{uuid.uuid4().hex[:12]}"
    url = args.url
    if url is None:
        port = free_port()
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{prefix}.log"
        env = {"REDIS_URL": args.redis_url, "SENAB_REDIS_PREFIX": prefix, "SENAB_LOG_LEVEL": "WARNING"}
        print(f"starting senab serve on 127.0.0.1:{port} (log {log_path})")
        server = start_server(port, env, log_path)
        url = f"http://127.0.0.1:{port}"
    try:
        model = args.model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][1]["id"]
        result = asyncio.run(run(url, model, args.clients, args.seconds, args.tokens))
    finally:
        if server is not None:
            stop_server(server, args.redis_url, prefix)

    print(f"{hardware()}; {args.clients} clients for {result['seconds']:.0f} s, max_tokens {args.tokens}, {model}")
    print_table("turns", ["committed turns", "turns/s", "latency p50 s", "latency p99 s", "TTFT p50 s",
                          "TTFT p99 s"],
                [[result["turns"], result["turns"] / result["seconds"], result["latency_p50"],
                  result["latency_p99"], result["ttft_p50"], result["ttft_p99"]]])
    print_table("errors by status (before the retry with the same key)", ["status", "count"],
                [[status, count] for status, count in sorted(result["errors"].items())] or [["none", 0]])
    print_table("state audit", ["lost turns", "duplicated turns", "sessions with a gap in the trajectory"],
                [[result["lost"], result["duplicated"], result["bad_trajectories"]]])
    save("load", {"command": "python bench/load.py " + " ".join(argv or sys.argv[1:]), **result})
    return 0 if result["lost"] == result["duplicated"] == result["bad_trajectories"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
