"""Continuous batching through the HTTP server: concurrent requests share decode steps,
return the replies they return alone, and a full queue rejects requests with 429."""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest

from app.config import Settings
from app.engine import ServedModel
from app.main import create_app
from app.store import RedisStateStore
from senab.bridge import new_checkpoint
from tests.app.conftest import TINY, delete_prefix, run_server, scrape_metrics
from tests.conftest import free_port
from tests.helpers import make_tiny_llama, randomize_write_out

SENAB = f"{TINY}+senab"
PROMPTS = ["Hello, world!", "What is the capital of France?", "Hi", "Tell me about the sea and the wind",
           "Numbers: 1 2 3", "Good morning to you"]


@contextlib.contextmanager
def serve(redis_url: str, *, step_delay_s: float, **settings) -> Iterator[httpx.Client]:
    """A server on its own tiny model (write-out randomized, so sessions change replies) whose
    forward passes each take at least `step_delay_s`, so concurrent requests overlap."""
    model, tokenizer = make_tiny_llama(seed=0)
    checkpoint = new_checkpoint(model.config, base_model=TINY)
    randomize_write_out(checkpoint.bridge)
    served = ServedModel(model=model, tokenizer=tokenizer, name=TINY, context_length=256, checkpoint=checkpoint)
    model.register_forward_pre_hook(lambda *args: time.sleep(step_delay_s))
    prefix = f"senab-test-{uuid.uuid4().hex}"
    settings = Settings(default_temperature=0, max_tokens_default=24, max_tokens_cap=200, **settings)
    app = create_app(settings, served=served, store=RedisStateStore(redis_url, prefix=prefix))
    server, thread = run_server(app, free_port())
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        delete_prefix(redis_url, prefix)


def ask(client: httpx.Client, i: int, session_prefix: str) -> httpx.Response:
    model = SENAB if i % 2 == 0 else TINY
    return client.post("/v1/chat/completions", headers={"X-Session-Id": f"{session_prefix}-{i}"},
                       json={"model": model, "max_tokens": 24,
                             "messages": [{"role": "user", "content": PROMPTS[i]}]})


def test_concurrent_requests_share_steps_and_reply_as_alone(redis_url):
    with serve(redis_url, step_delay_s=0.01, max_batch_size=8) as client:
        alone = [ask(client, i, "alone") for i in range(len(PROMPTS))]
        before = scrape_metrics(client)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda i: ask(client, i, "together"), range(len(PROMPTS))))
        after = scrape_metrics(client)

    for i, (single, batched) in enumerate(zip(alone, together)):
        assert single.status_code == batched.status_code == 200, (single.text, batched.text)
        assert batched.json()["choices"][0]["message"]["content"] == single.json()["choices"][0]["message"]["content"], i
        if i % 2 == 0:
            assert batched.json()["senab"]["distance"] == pytest.approx(single.json()["senab"]["distance"], abs=1e-4)
    steps = after[("senab:batch_size_count", frozenset())] - before[("senab:batch_size_count", frozenset())]
    alone_steps = after[("senab:batch_size_bucket", frozenset({("le", "1.0")}))] - \
        before[("senab:batch_size_bucket", frozenset({("le", "1.0")}))]
    assert alone_steps < steps, "no decode step had more than one sequence"


def test_full_queue_answers_429_with_retry_after(redis_url):
    with serve(redis_url, step_delay_s=0.05, max_batch_size=1, max_queue=1) as client:
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda i: ask(client, i % len(PROMPTS), f"queue-{i}"), range(5)))

    statuses = sorted(r.status_code for r in replies)
    assert 200 in statuses, statuses
    assert 429 in statuses, statuses
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["Retry-After"].isdigit()
    assert rejected.json()["error"]["code"] == "rate_limit_exceeded"



def test_stop_with_a_full_queue_cancels_and_rejects():
    import asyncio

    from app.engine import Engine
    from app.errors import ModelUnavailable
    from senab.generation import GenerationRequest, SamplingParams

    model, tokenizer = make_tiny_llama(seed=0)
    served = ServedModel(model=model, tokenizer=tokenizer, name=TINY, context_length=256,
                         checkpoint=new_checkpoint(model.config))
    hook = model.register_forward_pre_hook(lambda *args: time.sleep(0.05))
    engine = Engine(served, max_queue=2, max_batch_size=1)
    prompt = tokenizer("Hello", add_special_tokens=False).input_ids

    async def run():
        engine.start()
        request = GenerationRequest(prompt, SamplingParams(max_tokens=200, temperature=0))
        running = engine.submit(request, request_id="running", timeout_s=60)
        first = await running.events.get()  # the running row has produced output
        queued = [engine.submit(request, request_id=f"queued-{i}", timeout_s=60) for i in range(2)]
        started = time.monotonic()
        await asyncio.to_thread(engine.stop, 5.0)
        stopped_in = time.monotonic() - started
        outcomes = []
        for job in queued:
            outcomes.append(await job.events.get())
        last = first
        while last.finish_reason is None:
            last = await running.events.get()
        return stopped_in, outcomes, last

    try:
        stopped_in, outcomes, last = asyncio.run(run())
    finally:
        hook.remove()

    assert stopped_in < 5
    assert all(isinstance(outcome, ModelUnavailable) for outcome in outcomes)
    assert last.finish_reason == "cancelled"


def engine_on_tiny_model(**options):
    from app.engine import Engine

    model, tokenizer = make_tiny_llama(seed=0)
    served = ServedModel(model=model, tokenizer=tokenizer, name=TINY, context_length=256,
                         checkpoint=new_checkpoint(model.config))
    return Engine(served, **options), model, tokenizer


def test_token_goes_out_before_the_next_forward():
    import asyncio
    import threading

    from senab.generation import GenerationRequest, SamplingParams

    engine, model, tokenizer = engine_on_tiny_model()
    release = threading.Event()
    calls = []

    def hold_second_forward(*args):
        calls.append(time.monotonic())
        if len(calls) == 2:  # the first decode forward, after the prefill
            release.wait(10)

    hook = model.register_forward_pre_hook(hold_second_forward)
    prompt = tokenizer("Hello", add_special_tokens=False).input_ids

    async def run():
        engine.start()
        job = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0)),
                            request_id="first-token", timeout_s=60)
        first = await asyncio.wait_for(job.events.get(), 5)  # arrives while the forward is held
        release.set()
        rest = [item async for item in job.stream()]
        return first, rest

    try:
        first, rest = asyncio.run(run())
    finally:
        release.set()
        hook.remove()
        engine.stop()
    assert first.completion_tokens == 1
    assert first.finish_reason is None
    assert rest[-1].finish_reason is not None


def test_engine_survives_failed_forward(monkeypatch):
    import asyncio

    from senab.generation import DecodeBatch, GenerationRequest, SamplingParams

    engine, _, tokenizer = engine_on_tiny_model()
    forward = DecodeBatch.forward
    failures = []

    def fail_once(self):
        if not failures:
            failures.append(True)
            raise RuntimeError("injected forward failure")
        return forward(self)

    monkeypatch.setattr(DecodeBatch, "forward", fail_once)
    prompt = tokenizer("Hello", add_special_tokens=False).input_ids
    request = GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0))

    async def run():
        engine.start()
        failed = engine.submit(request, request_id="fails", timeout_s=60)
        items = []
        with pytest.raises(RuntimeError, match="injected forward failure"):
            async for item in failed.stream():
                items.append(item)
        served = engine.submit(request, request_id="after", timeout_s=60)
        return items, [item async for item in served.stream()]

    try:
        before_failure, after = asyncio.run(run())
    finally:
        engine.stop()
    assert [item.completion_tokens for item in before_failure] == [1]  # sent before the forward failed
    assert after[-1].finish_reason == "length"
    assert after[-1].completion_tokens == 4
