"""A live SENAB server on a free 127.0.0.1 port, serving a tiny random model."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis
import uvicorn

from app.config import Settings
from app.engine import ServedModel
from app.main import create_app
from app.store import RedisStateStore, StateStore
from senab.bridge import new_checkpoint
from tests.conftest import free_port
from tests.helpers import make_tiny_llama

TINY = "tiny-llama"


@dataclass
class LiveServer:
    url: str
    store: StateStore
    served: ServedModel
    client: httpx.Client

    def chat(self, messages, *, model: str = f"{TINY}+senab", session_id: str | None = None,
             **fields) -> httpx.Response:
        headers = {"X-Session-Id": session_id} if session_id else {}
        return self.client.post("/v1/chat/completions", headers=headers,
                                json={"model": model, "messages": messages, **fields})


def run_server(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def tiny_served() -> ServedModel:
    model, tokenizer = make_tiny_llama(seed=0)
    return ServedModel(model=model, tokenizer=tokenizer, name=TINY, context_length=256,
                       checkpoint=new_checkpoint(model.config, base_model=TINY))


@pytest.fixture(scope="module")
def redis_prefix() -> str:
    return f"senab-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def live_server(tiny_served, redis_url, redis_prefix) -> Iterator[LiveServer]:
    """A server whose sessions live in the test Redis under a private prefix; greedy by default."""
    store = RedisStateStore(redis_url, prefix=redis_prefix)
    settings = Settings(default_temperature=0, max_tokens_default=16, max_tokens_cap=200, max_body_bytes=20_000)
    app = create_app(settings, served=tiny_served, store=store)
    port = free_port()
    server, thread = run_server(app, port)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield LiveServer(url=url, store=store, served=tiny_served, client=client)
    server.should_exit = True
    thread.join(10)
    delete_prefix(redis_url, redis_prefix)


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key a test server wrote under `prefix`."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def scrape_metrics(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """GET /metrics and return {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}
