"""Session state on Redis: load + commit round trip p50/p99, and memory per session.

Runs the server's own `SessionService` (decode, homeostasis update, Lua compare-and-set
commit, trajectory append) against the Redis at --redis-url under a private prefix, which
it deletes afterwards. Memory is Redis's `MEMORY USAGE` of one session's keys after 100
turns (record + 100-point trajectory).

Usage: python bench/store.py [--turns 2000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.sessions import SessionService  # noqa: E402
from app.store import RedisStateStore  # noqa: E402
from bench.common import check, percentile, print_table, print_targets, save  # noqa: E402
from senab.bridge import load_checkpoint, new_checkpoint  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "senab" / "weights" / "SmolLM2-135M-Instruct"


def checkpoint():
    if (WEIGHTS / "manifest.json").exists():
        return load_checkpoint(WEIGHTS)
    from transformers import LlamaConfig

    # The default model's shape, for a checkout without the shipped weights.
    return new_checkpoint(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                      num_hidden_layers=30, intermediate_size=1536, vocab_size=49152))


async def run(redis_url: str, turns: int) -> dict:
    prefix = f"senab-bench-{uuid.uuid4().hex[:12]}"
    store = RedisStateStore(redis_url, prefix=prefix)
    sessions = SessionService(store, checkpoint())
    channels = sessions.set_point.shape[0]
    rng = np.random.default_rng(0)
    round_trips, loads, commits = [], [], []
    try:
        await store.ping()
        session_ids = [f"bench-{i}" for i in range(max(1, turns // 100))]
        for turn in range(turns):
            session_id = session_ids[turn % len(session_ids)]
            started = time.perf_counter()
            loaded = await sessions.load_or_start("bench", session_id)
            loaded_at = time.perf_counter()
            await sessions.commit_turn("bench", loaded, readout=rng.normal(size=channels).astype(np.float32),
                                       digest=rng.bytes(32), reply="x" * 200, finish_reason="stop",
                                       prompt_tokens=40, completion_tokens=60)
            ended = time.perf_counter()
            round_trips.append(ended - started)
            loads.append(loaded_at - started)
            commits.append(ended - loaded_at)
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*{session_ids[0]}*")]
        memory = sum([await client.memory_usage(key) or 0 for key in keys])
        points = await client.xlen([k for k in keys if k.endswith(b"trajectory")][0])
        await client.aclose()
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
        await store.close()
    return {"turns": turns, "round_trip_ms": [t * 1000 for t in round_trips], "load_ms": [t * 1000 for t in loads],
            "commit_ms": [t * 1000 for t in commits], "session_bytes": memory, "trajectory_points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000, help="load + commit round trips (default 2000)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.redis_url, args.turns))
    rows = [[name, percentile(result[key], 50), percentile(result[key], 99)]
            for name, key in (("load", "load_ms"), ("commit", "commit_ms"), ("load + commit", "round_trip_ms"))]
    print_table(f"SessionService on Redis, {args.turns} turns (ms)", ["operation", "p50", "p99"], rows)
    print(f"\none session after {result['trajectory_points']} turns: {result['session_bytes']} bytes in Redis")
    targets = [check("load + commit p99, ms", percentile(result["round_trip_ms"], 99), 2.0, at_most=True),
               check("bytes per session, record + 100 points", result["session_bytes"], 32 * 1024, at_most=True)]
    met = print_targets(targets)
    save("store", {"command": "python bench/store.py " + " ".join(argv or sys.argv[1:]), "rows": rows,
                   "session_bytes": result["session_bytes"], "targets": targets})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
