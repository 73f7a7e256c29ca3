"""End to end: `senab serve` with the real SmolLM2-135M-Instruct, Redis, and the openai SDK.

The model is pulled once per machine into $SENAB_TEST_HOME (default ~/.cache/senab).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import redis

from senab.models import DEFAULT_MODEL, pull_model
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow

SENAB_MODEL = f"{DEFAULT_MODEL}+senab"
QUESTION = [{"role": "user", "content": "List three benefits of exercise."}]
BENEFIT_WORDS = ("health", "heart", "weight", "mood", "energy", "sleep", "strength", "stress", "muscle", "mental")


@pytest.fixture(scope="module")
def senab_home() -> Path:
    home = Path(os.environ.get("SENAB_TEST_HOME") or Path.home() / ".cache" / "senab")
    pull_model(home=home, progress=False)
    return home


@pytest.fixture(scope="module")
def server_env(senab_home, redis_url):
    prefix = f"senab-e2e-{uuid.uuid4().hex}"
    yield {"SENAB_HOME": str(senab_home), "REDIS_URL": redis_url, "SENAB_REDIS_PREFIX": prefix,
           "SENAB_DEFAULT_TEMPERATURE": "0"}
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def server(server_env, tmp_path_factory):
    process = ServerProcess(server_env, tmp_path_factory.mktemp("e2e") / "server.log")
    yield process
    process.stop()


def client_for(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_are_listed(server):
    ids = [m.id for m in client_for(server).models.list()]
    assert ids == [DEFAULT_MODEL, SENAB_MODEL]


def test_sensible_answer_and_two_turn_trajectory(server):
    client = client_for(server)
    first = client.chat.completions.create(model=SENAB_MODEL, messages=QUESTION, max_tokens=150)
    answer = first.choices[0].message.content
    session_id = first.model_extra["senab"]["session_id"]

    assert any(word in answer.lower() for word in BENEFIT_WORDS), answer
    assert "<|im_end|>" not in answer
    assert first.model_extra["senab"]["turn"] == 1

    stream = client.chat.completions.create(
        model=SENAB_MODEL, stream=True, max_tokens=60, extra_headers={"X-Session-Id": session_id},
        messages=QUESTION + [{"role": "assistant", "content": answer},
                             {"role": "user", "content": "Which one matters most for sleep?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    trajectory = httpx.get(f"{server.url}/sessions/{session_id}/trajectory").json()

    assert re.search(r"[A-Za-z]{3}", text), text  # replies in the chitchat style can be short ("1. Sleep")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["senab"]["turn"] == 2
    assert [p["turn"] for p in trajectory["points"]] == [1, 2]
    assert trajectory["points"][1]["distance"] > 0


def test_streamed_reply_equals_plain_reply(server):
    client = client_for(server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=30)
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=30, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert text == plain.choices[0].message.content
    assert "Paris" in text


def test_trajectory_survives_restart(server_env, tmp_path):
    first = ServerProcess(server_env, tmp_path / "first.log")
    try:
        reply = client_for(first).chat.completions.create(
            model=SENAB_MODEL, messages=[{"role": "user", "content": "Hi there!"}], max_tokens=20,
            extra_headers={"X-Session-Id": "restart-session"})
        before = httpx.get(f"{first.url}/sessions/restart-session/state").json()
    finally:
        first.stop()

    second = ServerProcess(server_env, tmp_path / "second.log")
    try:
        after = httpx.get(f"{second.url}/sessions/restart-session/state").json()
        points = httpx.get(f"{second.url}/sessions/restart-session/trajectory").json()["points"]
    finally:
        second.stop()

    assert reply.model_extra["senab"]["turn"] == 1
    assert after == before
    assert len(points) == 1
    log = (tmp_path / "second.log").read_text()
    assert re.search(r"session state is kept in Redis at redis://", log)


def test_killed_server_keeps_previous_turn(server_env, tmp_path, redis_url):
    import asyncio

    from app.store import RedisStateStore
    from senab.state import SessionRecord

    session_id = f"killed-{uuid.uuid4().hex}"
    process = ServerProcess(server_env, tmp_path / "killed.log")
    try:
        client_for(process).chat.completions.create(
            model=SENAB_MODEL, messages=[{"role": "user", "content": "Hi there!"}], max_tokens=8,
            extra_headers={"X-Session-Id": session_id})
        before = httpx.get(f"{process.url}/sessions/{session_id}/state").json()
        body = {"model": SENAB_MODEL, "stream": True, "max_tokens": 200,
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
        with httpx.stream("POST", f"{process.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"X-Session-Id": session_id}) as response:
            chunks = response.iter_lines()
            while "content" not in next(chunks):
                pass
            process.process.kill()  # SIGKILL: no shutdown handler runs
            process.process.wait(10)
    finally:
        process.stop()

    async def read():
        store = RedisStateStore(redis_url, prefix=server_env["SENAB_REDIS_PREFIX"])
        try:
            return await store.load("default", session_id), await store.trajectory("default", session_id)
        finally:
            await store.close()

    stored, points = asyncio.run(read())
    record = SessionRecord.decode(stored.record, checkpoint_id=before["checkpoint"])
    assert record.turn == before["turn"] == 1
    assert record.state.tolist() == pytest.approx(before["state"], abs=1e-6)
    assert [turn for turn, _ in points] == [1]


def test_served_valence_follows_the_scripted_conversation(server):
    """The shipped bridge, served: valence falls on the hostile turn and recovers after it."""
    from senab.evaluate import HOSTILE_TURN, SCRIPTED_CONVERSATION

    client = client_for(server)
    messages: list[dict[str, str]] = []
    session_id = f"scripted-{uuid.uuid4().hex}"
    points = []
    for user, _ in SCRIPTED_CONVERSATION[:HOSTILE_TURN + 4]:
        messages.append({"role": "user", "content": user})
        reply = client.chat.completions.create(model=SENAB_MODEL, messages=messages, max_tokens=40,
                                               extra_headers={"X-Session-Id": session_id})
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        points.append(reply.model_extra["senab"])

    valence = [p["valence"] for p in points]
    distance = [p["distance"] for p in points]
    assert valence[HOSTILE_TURN] < valence[HOSTILE_TURN - 1], valence
    assert max(valence[HOSTILE_TURN + 1:]) > valence[HOSTILE_TURN], valence
    assert distance[HOSTILE_TURN] > distance[HOSTILE_TURN - 1], distance
    assert min(distance[HOSTILE_TURN + 1:]) < distance[HOSTILE_TURN], distance
