"""The prefix cache through the HTTP server: replies, tenants and metrics."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from app.config import Settings
from app.engine import ServedModel
from app.main import create_app
from app.store import RedisStateStore
from senab.bridge import new_checkpoint
from tests.app.conftest import delete_prefix, run_server, scrape_metrics
from tests.conftest import free_port
from tests.helpers import make_tiny_llama

MODEL = "tiny-llama-6"
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly and kindly."}
KEYS = {"alpha": "alpha-key-0123456789abcdef", "beta": "beta-key-0123456789abcdef"}


@pytest.fixture(scope="module")
def server(redis_url):
    """A server with API keys for two tenants over a 6-layer tiny Llama, so 2 layers lie below the bridge."""
    model, tokenizer = make_tiny_llama(seed=0, layers=6)
    served = ServedModel(model=model, tokenizer=tokenizer, name=MODEL, context_length=256,
                         checkpoint=new_checkpoint(model.config, base_model=MODEL))
    prefix = f"senab-test-{uuid.uuid4().hex}"
    settings = Settings(default_temperature=0, max_tokens_default=12, prefix_cache_mb=4,
                        api_keys=",".join(f"{tenant}:{key}" for tenant, key in KEYS.items()))
    app = create_app(settings, served=served, store=RedisStateStore(redis_url, prefix=prefix))
    port = free_port()
    uvicorn_server, thread = run_server(app, port)
    yield f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(10)
    delete_prefix(redis_url, prefix)


def ask(url: str, tenant: str, question: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0)
    reply = client.chat.completions.create(
        model=f"{MODEL}+senab", messages=[SYSTEM, {"role": "user", "content": question}],
        extra_headers={"X-Session-Id": f"s-{uuid.uuid4().hex}"})
    return reply.choices[0].message.content, reply.usage.prompt_tokens


def metrics(url: str) -> dict:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alpha']}"}) as client:
        return scrape_metrics(client)


def hits(scraped: dict) -> float:
    return scraped[("senab:prefix_cache_hits_total", frozenset())]


def test_second_request_reuses_the_system_prompt(server):
    before = metrics(server)
    first, prompt_tokens = ask(server, "alpha", "Name three birds.")
    second, _ = ask(server, "alpha", "Name three birds.")
    after = metrics(server)

    # New sessions start at the same set-point, so greedy replies match, the second from the cache.
    assert second == first
    found = hits(after) - hits(before)
    assert 16 <= found < prompt_tokens
    assert after[("senab:prefix_cache_queries_total", frozenset())] \
        - before[("senab:prefix_cache_queries_total", frozenset())] == 2 * prompt_tokens
    assert after[("senab:prefix_cache_usage_bytes", frozenset())] > 0


def test_tenants_do_not_share_prefixes(server):
    ask(server, "alpha", "What is the sea made of?")
    before = metrics(server)

    ask(server, "beta", "What is the sea made of?")

    assert hits(metrics(server)) == hits(before)
