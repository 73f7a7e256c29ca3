"""Concurrency, idempotent retries, API keys and bad input, on live servers with a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis

from app.config import Settings
from app.errors import StateConflict
from app.main import create_app
from app.store import MemoryStateStore, RedisStateStore
from senab.state import _RECORD_HEAD, SessionRecord
from tests.app.conftest import TINY, delete_prefix, run_server
from tests.app.test_api import BAD_REQUESTS, HELLO, SENAB, assert_error
from tests.conftest import free_port

KEY_A = "alice:" + "a" * 32
KEY_B = "b" * 40


@contextlib.contextmanager
def serve(served, store, **settings) -> Iterator[httpx.Client]:
    """Run a server with `store` and greedy decoding; yield a client for it."""
    app = create_app(Settings(default_temperature=0, max_tokens_default=8, **settings), served=served,
                     store=store)
    port = free_port()
    server, thread = run_server(app, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def chat(client: httpx.Client, content: str, *, session_id: str | None = None, key: str | None = None,
         idempotency_key: str | None = None, **fields) -> httpx.Response:
    headers = {}
    if session_id:
        headers["X-Session-Id"] = session_id
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    body = {"model": SENAB, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_twenty_concurrent_turns_commit_once(live_server):
    session_id = f"busy-{uuid.uuid4().hex}"

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as client:
            return await asyncio.gather(*[
                client.post("/v1/chat/completions", headers={"X-Session-Id": session_id}, json={
                    "model": SENAB, "max_tokens": 3, "messages": [{"role": "user", "content": f"message {i}"}]})
                for i in range(20)])

    responses = asyncio.run(send_all())
    state = live_server.client.get(f"/sessions/{session_id}/state").json()
    points = live_server.client.get(f"/sessions/{session_id}/trajectory").json()["points"]
    live_server.client.delete(f"/sessions/{session_id}")

    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.json()["senab"]["turn"] for r in responses) == list(range(1, 21))
    assert state["turn"] == 20
    assert [p["turn"] for p in points] == list(range(1, 21))


class AlwaysConflicting(MemoryStateStore):
    """A store whose every commit finds a newer version (another writer always wins)."""

    commits = 0

    async def commit(self, tenant, session_id, **kwargs):
        self.commits += 1
        raise StateConflict("another writer committed first")


def test_commit_conflicts_give_409(tiny_served):
    store = AlwaysConflicting()
    with serve(tiny_served, store) as client:
        response = chat(client, "hello", session_id="contested")
        state = client.get("/sessions/contested/state")

    assert_error(response, 409, "state_conflict", "session_id")
    assert "Retry" in response.json()["error"]["message"]
    assert store.commits == 5  # bounded: SessionService.max_commit_attempts
    assert_error(state, 404, "session_not_found")


def test_idempotency_key_replays_the_first_reply(live_server):
    session_id = f"idem-{uuid.uuid4().hex}"
    key = str(uuid.uuid4())
    client = live_server.client

    first = chat(client, "Tell me something.", session_id=session_id, idempotency_key=key, max_tokens=12)
    chat(client, "And then?", session_id=session_id)  # a later turn moves the state on
    retried = chat(client, "Tell me something.", session_id=session_id, idempotency_key=key, max_tokens=12)
    streamed = client.post("/v1/chat/completions", headers={"X-Session-Id": session_id, "Idempotency-Key": key},
                           json={"model": SENAB, "max_tokens": 12, "stream": True,
                                 "messages": [{"role": "user", "content": "Tell me something."}]})
    reused = chat(client, "Something else entirely.", session_id=session_id, idempotency_key=key)
    state = client.get(f"/sessions/{session_id}/state").json()
    client.delete(f"/sessions/{session_id}")

    assert first.status_code == retried.status_code == 200
    assert retried.json()["choices"] == first.json()["choices"]
    assert retried.json()["senab"] == first.json()["senab"]
    assert retried.json()["usage"] == first.json()["usage"]
    text = "".join(line for line in _stream_texts(streamed.text))
    assert text == first.json()["choices"][0]["message"]["content"]
    assert_error(reused, 422, "idempotency_key_reused", "Idempotency-Key")
    assert state["turn"] == 2


def test_new_key_on_a_replayed_turn_is_remembered(live_server):
    # The second key first gets turn 1's reply, because the conversation repeats the last turn.
    # A retry with it after a later turn must return that reply again, not run a new turn.
    session_id = f"idem-replay-{uuid.uuid4().hex}"
    client = live_server.client
    first = chat(client, "Hi there", session_id=session_id, idempotency_key="key-one")
    replayed = chat(client, "Hi there", session_id=session_id, idempotency_key="key-two")
    chat(client, "Something else", session_id=session_id)
    retried = chat(client, "Hi there", session_id=session_id, idempotency_key="key-two")
    state = client.get(f"/sessions/{session_id}/state").json()
    client.delete(f"/sessions/{session_id}")

    assert replayed.json()["choices"] == first.json()["choices"]
    assert retried.json()["choices"] == first.json()["choices"]
    assert retried.json()["senab"]["turn"] == 1
    assert state["turn"] == 2


def _stream_texts(body: str) -> Iterator[str]:
    for block in body.strip().split("\n\n"):
        payload = block.removeprefix("data: ")
        if payload != "[DONE]":
            for choice in json.loads(payload).get("choices", []):
                yield choice["delta"].get("content") or ""


def test_idempotency_key_without_session_id(live_server):
    key = str(uuid.uuid4())
    first = chat(live_server.client, "hi", idempotency_key=key)
    retried = chat(live_server.client, "hi", idempotency_key=key)
    session_id = first.headers["X-Session-Id"]
    state = live_server.client.get(f"/sessions/{session_id}/state").json()
    live_server.client.delete(f"/sessions/{session_id}")

    assert retried.headers["X-Session-Id"] == session_id
    assert retried.json()["choices"] == first.json()["choices"]
    assert state["turn"] == 1


@pytest.mark.parametrize("key", ["has space", "x" * 256, "na\xefve".encode("latin-1")])
def test_invalid_idempotency_key(live_server, key):
    response = live_server.client.post("/v1/chat/completions", headers={"Idempotency-Key": key},
                                       json={"model": SENAB, "messages": HELLO})
    assert_error(response, 400, "invalid_request", "Idempotency-Key")


def test_api_keys_namespace_sessions(tiny_served, redis_url, caplog):
    prefix = f"senab-test-{uuid.uuid4().hex}"
    store = RedisStateStore(redis_url, prefix=prefix)
    caplog.set_level(logging.DEBUG)
    key_a, key_b = KEY_A.split(":", 1)[1], KEY_B
    try:
        with serve(tiny_served, store, api_keys=f"{KEY_A},{KEY_B}") as client:
            anonymous = chat(client, "hi", session_id="shared-name")
            wrong = chat(client, "hi", session_id="shared-name", key="c" * 32)
            basic = client.post("/v1/chat/completions", headers={"Authorization": f"Basic {key_a}"},
                                json={"model": SENAB, "messages": HELLO})
            models = client.get("/v1/models")
            health = client.get("/healthz")
            created = chat(client, "hi", session_id="shared-name", key=key_a)
            own = client.get("/sessions/shared-name/state", headers={"Authorization": f"Bearer {key_a}"})
            other_state = client.get("/sessions/shared-name/state", headers={"Authorization": f"Bearer {key_b}"})
            other_trajectory = client.get("/sessions/shared-name/trajectory",
                                          headers={"Authorization": f"Bearer {key_b}"})
            other_delete = client.delete("/sessions/shared-name", headers={"Authorization": f"Bearer {key_b}"})
            other_chat = chat(client, "hello", session_id="shared-name", key=key_b)
            own_after = client.get("/sessions/shared-name/state", headers={"Authorization": f"Bearer {key_a}"})
            server_id = chat(client, "hi", key=key_b).headers["X-Session-Id"]
    finally:
        asyncio.run(store.close())
        delete_prefix(redis_url, prefix)

    for response in (anonymous, wrong, basic, models):
        assert_error(response, 401, "invalid_api_key")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert health.status_code == 200
    assert created.status_code == 200
    assert own.status_code == 200
    assert_error(other_state, 404, "session_not_found")
    assert_error(other_trajectory, 404, "session_not_found")
    assert_error(other_delete, 404, "session_not_found")
    assert other_chat.json()["senab"]["turn"] == 1  # a session of its own under the same name
    assert own_after.json()["turn"] == 1
    assert len(server_id) == 32
    assert int(server_id, 16) >= 0
    assert key_a not in caplog.text
    assert key_b not in caplog.text


@pytest.mark.parametrize("value, message", [
    ("", "contains no key"), ("short", "shorter than 16"), ("bad name!:" + "k" * 20, "invalid tenant name"),
    ("k" * 20 + "," + "k" * 20, "same key twice"), ("a:b:" + "k" * 20, "':'"), ("name:" + "é" * 20, "non-ASCII"),
])
def test_api_keys_setting_is_checked(value, message):
    with pytest.raises(ValueError, match=message) as error:
        Settings(api_keys=value)
    if len(value) >= 16:
        assert "k" * 16 not in str(error.value)


@pytest.mark.parametrize("value", ["short-secret", "bad name!:" + "s" * 20])
def test_serve_does_not_print_a_rejected_key(value):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "SENAB_API_KEYS": value})

    assert result.returncode == 2
    assert "SENAB_API_KEYS" in result.stderr
    assert value.split(":")[-1] not in result.stderr


def test_bad_requests_leave_stored_state_as_it_was(live_server, redis_url, redis_prefix):
    """Every case of the bad-request table, sent to an existing session, changes nothing stored."""
    session_id = f"untouched-{uuid.uuid4().hex}"
    assert live_server.chat(HELLO, session_id=session_id).status_code == 200
    client = redis.Redis.from_url(redis_url)
    keys = sorted(client.scan_iter(match=f"{redis_prefix}:{{default:{session_id}}}:*"))

    def snapshot():
        return {key: client.dump(key) for key in keys}

    before = snapshot()
    for name, body, status, code, _ in BAD_REQUESTS:
        if "session_id" in body:
            continue  # those name another session
        response = live_server.client.post("/v1/chat/completions", content=json.dumps(body),
                                           headers={"X-Session-Id": session_id, "Content-Type": "application/json"})
        assert response.status_code == status, (name, response.text)
    after = snapshot()
    live_server.client.delete(f"/sessions/{session_id}")
    client.close()

    assert after == before


def test_nan_record_is_rejected_and_kept(live_server, redis_url, redis_prefix):
    session_id = f"nan-{uuid.uuid4().hex}"
    checkpoint_id = live_server.served.checkpoint.checkpoint_id
    record = bytearray(SessionRecord.start(checkpoint_id, np.zeros(32, np.float32)).encode())
    struct.pack_into("<f", record, _RECORD_HEAD.size, float("nan"))  # the first state value
    client = redis.Redis.from_url(redis_url)
    client.hset(f"{redis_prefix}:{{default:{session_id}}}:state", mapping={"v": 1, "r": bytes(record)})
    state = live_server.client.get(f"/sessions/{session_id}/state")
    turn = live_server.chat(HELLO, session_id=session_id)
    stored = client.hget(f"{redis_prefix}:{{default:{session_id}}}:state", "r")
    client.delete(f"{redis_prefix}:{{default:{session_id}}}:state")
    client.close()

    assert "NaN" in assert_error(state, 409, "state_invalid")["message"]
    assert_error(turn, 409, "state_invalid")
    assert stored == bytes(record)


def test_prompt_token_limit(tiny_served):
    with serve(tiny_served, MemoryStateStore(), max_prompt_tokens=20) as client:
        response = chat(client, "Hello, world! " * 10)
    error = assert_error(response, 400, "context_length_exceeded", "messages")
    assert "20" in error["message"]
    assert "SENAB_MAX_PROMPT_TOKENS" in error["message"]


def test_unicode_edge_cases_round_trip(live_server):
    session_id = f"text-{uuid.uuid4().hex}"
    text = "🧪👩🏽‍🔬 e\u0301 \u202eשלום עולם\u202c مرحبا"
    first = live_server.chat([{"role": "user", "content": text}], session_id=session_id, max_tokens=4)
    again = live_server.chat([{"role": "user", "content": text}], session_id=session_id, max_tokens=4)
    live_server.client.delete(f"/sessions/{session_id}")

    assert first.status_code == 200
    assert again.json()["senab"]["turn"] == 1  # the same conversation is a retry, not a new turn


@pytest.mark.parametrize("flags, code, message", [
    (["--quantization", "q8"], 2, "invalid setting SENAB_QUANTIZATION='q8'"),
    (["--quantization", "int4", "--dtype", "float32"], 1, "set dtype to bfloat16"),
])
def test_serve_explains_a_quantization_it_cannot_use(flags, code, message, tmp_path):
    run_serve_expecting(flags, code, message, tmp_path, {})


def test_serve_rejects_bad_native_kernels(tmp_path):
    run_serve_expecting([], 2, "invalid setting SENAB_NATIVE_KERNELS='maybe': Value error, SENAB_NATIVE_KERNELS "
                        "must be 1 or 0", tmp_path, {"SENAB_NATIVE_KERNELS": "maybe"})


def run_serve_expecting(flags, code, message, tmp_path, env):
    import subprocess
    import sys

    # Both are refused before any model is looked for (SENAB_HOME is empty).
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0", *flags], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "SENAB_HOME": str(tmp_path), **env})

    assert result.returncode == code, result.stderr
    assert message in result.stderr


def test_error_log_names_a_valid_session(tiny_served, caplog):
    from app.store import create_store

    caplog.set_level(logging.INFO, logger="app.errors")
    with serve(tiny_served, create_store(None)) as client:
        unknown = chat(client, "Hi", session_id="log-check-1", model="no-such-model")
        invalid = client.post("/v1/chat/completions", headers={"X-Session-Id": "../x"},
                              json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert unknown.status_code == 404
    assert invalid.status_code in (400, 404)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.errors"]
    assert any("(session log-check-1) failed: model_not_found" in line for line in lines), lines
    assert not any("../x" in line for line in lines)
