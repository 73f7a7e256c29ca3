"""Two `senab serve` processes sharing one Redis: any replica can serve any turn of a session."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.app.conftest import delete_prefix
from tests.helpers import ServerProcess, save_model_and_bridge

TURNS = ["Hello there!", "How is the weather?", "Numbers: 1 2 3", "Tell me more.", "Why?", "Goodbye."]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis_url):
    """Start two servers of a tiny model sharing one Redis prefix. The bridge's write-out is
    not zero, so the session state changes the replies."""
    root = tmp_path_factory.mktemp("replicas")
    model_dir, bridge_dir = save_model_and_bridge(root, "tiny-model")
    prefix = f"senab-replicas-{uuid.uuid4().hex}"
    env = {"SENAB_MODEL": str(model_dir), "SENAB_BRIDGE": str(bridge_dir), "REDIS_URL": redis_url,
           "SENAB_REDIS_PREFIX": prefix, "SENAB_DEFAULT_TEMPERATURE": "0", "SENAB_MAX_TOKENS_DEFAULT": "6"}
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(ServerProcess(env, root / f"server-{name}.log"))
        yield servers
    finally:
        for server in servers:
            server.stop()
        delete_prefix(redis_url, prefix)


def converse(urls: list[str], session_id: str, model: str = "tiny-model+senab") -> list[dict]:
    """Send TURNS as one conversation, turn i to urls[i % len(urls)]; return the responses."""
    messages, responses = [], []
    for i, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        response = httpx.post(f"{urls[i % len(urls)]}/v1/chat/completions", timeout=60,
                              headers={"X-Session-Id": session_id},
                              json={"model": model, "messages": messages})
        assert response.status_code == 200, response.text
        body = response.json()
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        responses.append(body)
    return responses


def test_alternating_replicas_equal_one_server(replicas):
    a, b = replicas
    alternating = converse([a.url, b.url], f"alternate-{uuid.uuid4().hex}")
    single = converse([a.url], f"single-{uuid.uuid4().hex}")
    base = converse([a.url], f"base-{uuid.uuid4().hex}", model="tiny-model")
    session_id = alternating[0]["senab"]["session_id"]
    trajectory = httpx.get(f"{b.url}/sessions/{session_id}/trajectory").json()["points"]
    single_trajectory = httpx.get(f"{a.url}/sessions/{single[0]['senab']['session_id']}/trajectory").json()["points"]

    replies = [r["choices"][0]["message"]["content"] for r in alternating]
    assert replies == [r["choices"][0]["message"]["content"] for r in single]
    # The bridge changes the replies, so equal sequences show that both replicas ran it with the same state.
    assert replies != [r["choices"][0]["message"]["content"] for r in base]
    assert [r["senab"]["turn"] for r in alternating] == list(range(1, len(TURNS) + 1))
    assert [p["turn"] for p in trajectory] == list(range(1, len(TURNS) + 1))
    for ours, theirs in zip(trajectory, single_trajectory):
        assert ours["state"] == pytest.approx(theirs["state"], abs=1e-5)


def test_concurrent_turns_across_replicas_commit_once(replicas):
    session_id = f"both-{uuid.uuid4().hex}"
    urls = [server.url for server in replicas]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[
                client.post(f"{urls[i % 2]}/v1/chat/completions", headers={"X-Session-Id": session_id},
                            json={"model": "tiny-model+senab", "max_tokens": 3,
                                  "messages": [{"role": "user", "content": f"message {i}"}]})
                for i in range(12)])

    responses = asyncio.run(send_all())
    state = httpx.get(f"{urls[0]}/sessions/{session_id}/state").json()
    points = httpx.get(f"{urls[1]}/sessions/{session_id}/trajectory").json()["points"]

    assert [r.status_code for r in responses] == [200] * 12
    assert sorted(r.json()["senab"]["turn"] for r in responses) == list(range(1, 13))
    assert state["turn"] == 12
    assert [p["turn"] for p in points] == list(range(1, 13))
