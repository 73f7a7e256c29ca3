"""The HTTP server under 1, 2, 4, 8 and 16 concurrent streaming clients, in one run.

Starts `senab serve` as a subprocess on a free loopback port (state in the Redis at
--redis-url under a private prefix, deleted afterwards), streams greedy completions of the
`+senab` model through /v1/chat/completions, and prints per level: aggregate tokens/s,
per-stream tokens/s, time to first token p50/p99, and the ratios of DESIGN section 10.
The single-stream rate is compared with the bare model's own loop (`model.generate`) in
this process, same dtype and weights, measured while the server is idle at the start of
every round. The server's peak resident
memory comes from /proc (Linux).

Usage: python bench/server.py [--tokens 64] [--levels 1,2,4,8,16] [--rounds 5] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (check, free_port, hardware, percentile, print_table, print_targets, save,  # noqa: E402
                          start_server, stop_server)

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_stream(client: httpx.AsyncClient, model: str, tokens: int) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    completion = 0
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"X-Session-Id": f"bench-{uuid.uuid4().hex}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first if first is not None else end
    return {"sent": sent, "first": first, "end": end, "tokens": completion}


async def run_level(url: str, model: str, streams: int, tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*(one_stream(client, model, tokens) for _ in range(streams)))
    started = min(r["sent"] for r in results)
    ended = max(r["end"] for r in results)
    total = sum(r["tokens"] for r in results)
    per_stream = [r["tokens"] / (r["end"] - r["sent"]) for r in results]
    ttft = [r["first"] - r["sent"] for r in results]
    return {"streams": streams, "tokens": total, "aggregate": total / (ended - started),
            "per_stream": sum(per_stream) / len(per_stream), "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99)}


class BareLoop:
    """The bare model's own decode loop (`model.generate`) in this process, same dtype and weights."""

    def __init__(self, dtype: str, quantization: str, tokens: int) -> None:
        from senab.models import load_model
        from senab.prompt import build_prompt

        loaded = load_model(None, dtype=dtype, quantization=quantization)
        self.model = loaded.model
        self.ids = build_prompt(loaded.tokenizer, [("user", PROMPT)]).ids
        self.tokens = tokens
        self.tokens_per_s(8)  # warm-up

    def tokens_per_s(self, tokens: int | None = None) -> float:
        from bench.decode import bare_tokens_per_s

        return bare_tokens_per_s(self.model, self.ids, tokens or self.tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per stream (default 64)")
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrent streams per level")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--dtype", default="auto", help="server and bare-loop dtype (default auto)")
    parser.add_argument("--quantization", default="auto", help="server and bare-loop quantization (default auto)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of every level; the median counts (default 5)")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.levels.split(",")]
    if 1 not in levels:
        parser.error(f"--levels {args.levels} must include 1, because every ratio is taken against one stream")

    from senab.models import DEFAULT_MODEL

    model = f"{DEFAULT_MODEL}+senab"
    prefix = f"senab-bench-{uuid.uuid4().hex[:12]}"
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{prefix}.log"
    env = {"REDIS_URL": args.redis_url, "SENAB_REDIS_PREFIX": prefix, "SENAB_DTYPE": args.dtype,
           "SENAB_QUANTIZATION": args.quantization,
           "SENAB_MAX_BATCH_SIZE": str(max(levels)), "SENAB_LOG_LEVEL": "WARNING"}
    bare_loop = BareLoop(args.dtype, args.quantization, args.tokens)
    server = start_server(port, env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(url, model, 1, 8))  # warm-up
        # A level lasts 1.5 to 5 s, and other tenants of a shared machine move such a run by
        # 10% either way; on the AMX Xeon one run's 16-stream ratio read 5.2x, 7.3x and 5.5x
        # in three rounds. So every level runs in each of --rounds rounds, and the table shows
        # each level's run with the median aggregate. The bare loop runs at the start of
        # every round, while the server is idle. Each target ratio is the median of the
        # rounds' ratios, so its two sides are measured in the same round, at most a minute
        # apart, rather than in whichever rounds gave the medians.
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in levels}
        bare_runs: list[float] = []
        for _ in range(args.rounds):
            bare_runs.append(bare_loop.tokens_per_s())
            for n in levels:
                runs[n].append(asyncio.run(run_level(url, model, n, args.tokens)))
        results = [sorted(runs[n], key=lambda r: r["aggregate"])[len(runs[n]) // 2] for n in levels]
        peak_mb = peak_rss_mb(server.pid)
    finally:
        stop_server(server, args.redis_url, prefix)
    bare = statistics.median(bare_runs)
    single_ratio = statistics.median(r["per_stream"] / b for r, b in zip(runs[1], bare_runs))

    single = next(r for r in results if r["streams"] == 1)
    rows = [[r["streams"], r["tokens"], r["aggregate"], r["aggregate"] / single["aggregate"], r["per_stream"],
             r["ttft_p50"], r["ttft_p99"]] for r in results]
    print(f"{hardware()}; server dtype {args.dtype}, quantization {args.quantization}; {args.tokens} tokens per "
          f"stream; median of {args.rounds} rounds")
    print_table("HTTP server, streaming", ["streams", "tokens", "aggregate tok/s", "x one stream",
                                          "per-stream tok/s", "TTFT p50 s", "TTFT p99 s"], rows)
    print(f"\nbare model.generate, one sequence: {bare:.1f} tokens/s (median of {len(bare_runs)}); "
          f"server peak RSS {peak_mb:.0f} MB")
    targets = [check("server single stream / bare loop (median of rounds)", single_ratio, 0.9)]
    for n, target in ((8, 4.0), (16, 6.0)):
        if n in runs:
            ratios = [many["aggregate"] / one["aggregate"] for many, one in zip(runs[n], runs[1])]
            print(f"{n} streams / 1 stream by round: " + ", ".join(f"{ratio:.2f}x" for ratio in ratios))
            targets.append(check(f"aggregate, {n} streams / 1 stream (median of rounds)",
                                 statistics.median(ratios), target))
    if 16 in levels:
        targets.append(check("server peak RSS at 16 streams, MB", peak_mb, 1536, at_most=True))
    met = print_targets(targets)
    save("server", {"command": "python bench/server.py " + " ".join(argv or sys.argv[1:]), "levels": results,
                    "bare_tokens_per_s": bare, "peak_rss_mb": peak_mb, "targets": targets})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
