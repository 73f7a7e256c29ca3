"""The HTTP API on a live server with a real Redis, driven by httpx and the openai SDK."""

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from senab.state import SessionRecord
from tests.app.conftest import TINY, scrape_metrics

SENAB = f"{TINY}+senab"
HELLO = [{"role": "user", "content": "Hello, world!"}]


def sse_events(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response, status: int, code: str, param: str | None = "unset"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"]
    if param != "unset":
        assert error["param"] == param
    return error


def test_two_turns_give_two_trajectory_points(live_server):
    first = live_server.chat(HELLO)
    assert first.status_code == 200, first.text
    session_id = first.headers["X-Session-Id"]
    assert len(session_id) == 32
    reply = first.json()["choices"][0]["message"]["content"]

    second = live_server.chat(HELLO + [{"role": "assistant", "content": reply},
                                       {"role": "user", "content": "And then?"}], session_id=session_id)
    assert second.status_code == 200, second.text
    trajectory = live_server.client.get(f"/sessions/{session_id}/trajectory").json()
    state = live_server.client.get(f"/sessions/{session_id}/state").json()

    assert [p["turn"] for p in trajectory["points"]] == [1, 2]
    assert second.json()["senab"]["turn"] == 2
    assert state["turn"] == 2
    assert state["state"] == trajectory["points"][-1]["state"]
    assert len(state["state"]) == 32
    assert state["checkpoint"] == live_server.served.checkpoint.checkpoint_id
    assert state["distance"] == pytest.approx(second.json()["senab"]["distance"])
    assert state["valence"] is None


def test_trajectory_since_and_limit(live_server):
    session_id = live_server.chat(HELLO).headers["X-Session-Id"]
    for text in ("two", "three"):
        assert live_server.chat([{"role": "user", "content": text}], session_id=session_id).status_code == 200

    since = live_server.client.get(f"/sessions/{session_id}/trajectory", params={"since": 1}).json()
    limited = live_server.client.get(f"/sessions/{session_id}/trajectory", params={"limit": 1}).json()

    assert [p["turn"] for p in since["points"]] == [2, 3]
    assert [p["turn"] for p in limited["points"]] == [1]


def test_body_session_id_field(live_server):
    response = live_server.client.post(
        "/v1/chat/completions", json={"model": SENAB, "messages": HELLO, "session_id": "body-session-1"})

    assert response.status_code == 200, response.text
    assert response.headers["X-Session-Id"] == "body-session-1"
    assert response.json()["senab"]["session_id"] == "body-session-1"
    live_server.client.delete("/sessions/body-session-1")


def test_reset_and_delete(live_server):
    session_id = live_server.chat(HELLO).headers["X-Session-Id"]

    reset = live_server.client.post(f"/sessions/{session_id}/reset")
    state = live_server.client.get(f"/sessions/{session_id}/state").json()
    points = live_server.client.get(f"/sessions/{session_id}/trajectory").json()["points"]
    deleted = live_server.client.delete(f"/sessions/{session_id}")
    after = live_server.client.get(f"/sessions/{session_id}/state")

    assert reset.status_code == 200
    assert state["turn"] == 0
    assert state["distance"] == 0.0
    assert points == []
    assert deleted.json() == {"id": session_id, "object": "session", "deleted": True}
    assert_error(after, 404, "session_not_found")


def test_stream_joins_to_non_streamed_reply(live_server):
    plain = live_server.chat(HELLO, max_tokens=20).json()
    streamed = live_server.chat(HELLO, max_tokens=20, stream=True, stream_options={"include_usage": True})

    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[0]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert finish[0]["senab"]["turn"] == 1
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain["usage"]


def test_stop_strings(live_server):
    full = live_server.chat(HELLO, max_tokens=30).json()["choices"][0]["message"]["content"]
    stop = full[5:8]

    stopped = live_server.chat(HELLO, max_tokens=30, stop=[stop, "never-there"]).json()
    streamed = live_server.chat(HELLO, max_tokens=30, stop=stop, stream=True)
    streamed_text = "".join(c["choices"][0]["delta"].get("content") or ""
                            for c in sse_events(streamed.text)[:-1] if c["choices"])

    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert streamed_text == full[:full.index(stop)]


def test_retried_turn_is_not_applied_twice(live_server):
    first = live_server.chat(HELLO, session_id="retry-session")
    again = live_server.chat(HELLO, session_id="retry-session")
    points = live_server.client.get("/sessions/retry-session/trajectory").json()["points"]

    assert again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert again.json()["senab"]["turn"] == 1
    assert len(points) == 1
    live_server.client.delete("/sessions/retry-session")


def test_base_model_turn_leaves_state(live_server):
    session_id = live_server.chat(HELLO).headers["X-Session-Id"]
    before = live_server.client.get(f"/sessions/{session_id}/state").json()

    base = live_server.chat([{"role": "user", "content": "Other"}], model=TINY, session_id=session_id)
    after = live_server.client.get(f"/sessions/{session_id}/state").json()

    assert base.status_code == 200
    assert base.json()["model"] == TINY
    assert base.json()["senab"]["turn"] == 1
    assert after == before


@pytest.fixture
def slow_model(live_server):
    """Make each forward pass take 20 ms so a test can act while a reply is being decoded."""
    handle = live_server.served.model.register_forward_pre_hook(lambda *args: time.sleep(0.02))
    yield
    handle.remove()


def test_disconnect_mid_stream_commits_nothing(live_server, slow_model):
    body = {"model": SENAB, "messages": HELLO, "max_tokens": 150, "stream": True}
    with live_server.client.stream("POST", "/v1/chat/completions", json=body,
                                   headers={"X-Session-Id": "cut-session"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")

    # The cancelled row leaves the batch at the next decode step.
    deadline = time.monotonic() + 10
    while scrape_metrics(live_server.client)[("senab:num_requests_running", frozenset())] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    running = scrape_metrics(live_server.client)[("senab:num_requests_running", frozenset())]
    follow_up = live_server.chat(HELLO, session_id="cut-session", max_tokens=4)
    points = live_server.client.get("/sessions/cut-session/trajectory").json()["points"]

    assert running == 0
    assert follow_up.status_code == 200
    assert follow_up.json()["senab"]["turn"] == 1
    assert [p["turn"] for p in points] == [1]
    live_server.client.delete("/sessions/cut-session")


def test_unicode_round_trip(live_server):
    text = "emoji 😀, combining e\u0301, right-to-left שלום, 日本語"
    response = live_server.chat([{"role": "user", "content": text}], max_tokens=8, session_id="unicode-session")

    assert response.status_code == 200
    assert response.json()["senab"]["turn"] == 1
    live_server.client.delete("/sessions/unicode-session")


def test_base_model_without_session_writes_nothing(live_server, redis_url, redis_prefix):
    import redis

    response = live_server.chat(HELLO, model=TINY)
    session_id = response.headers["X-Session-Id"]
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{redis_prefix}:*{session_id}*"))
    client.close()

    assert response.status_code == 200
    assert response.json()["senab"]["turn"] == 0
    assert keys == []
    assert_error(live_server.client.get(f"/sessions/{session_id}/state"), 404, "session_not_found")


def test_state_and_trajectory_agree(live_server):
    session_id = live_server.chat(HELLO).headers["X-Session-Id"]
    state = live_server.client.get(f"/sessions/{session_id}/state").json()
    point = live_server.client.get(f"/sessions/{session_id}/trajectory").json()["points"][-1]

    for field in ("arousal", "distance", "valence", "state"):
        assert state[field] == point[field], field


def test_models_list(live_server):
    models = live_server.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [TINY, SENAB]


def test_health_and_ready(live_server):
    assert live_server.client.get("/healthz").json() == {"status": "ok"}
    ready = live_server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["store"] == "redis"


BAD_REQUESTS = [
    ("no messages", {"model": SENAB, "messages": []}, 400, "invalid_request", "messages"),
    ("unknown role", {"model": SENAB, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request",
     "messages.0.role"),
    ("missing role", {"model": SENAB, "messages": [{"content": "x"}]}, 400, "invalid_request", "messages.0.role"),
    ("null content", {"model": SENAB, "messages": [{"role": "user", "content": None}]}, 400, "invalid_request",
     "messages.0.content"),
    ("image part", {"model": SENAB, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}, 400, "invalid_request",
     "messages.0.content"),
    ("n above 1", {"model": SENAB, "messages": HELLO, "n": 2}, 400, "invalid_request", "n"),
    ("negative temperature", {"model": SENAB, "messages": HELLO, "temperature": -0.5}, 400, "invalid_request",
     "temperature"),
    ("temperature above 2", {"model": SENAB, "messages": HELLO, "temperature": 2.5}, 400, "invalid_request",
     "temperature"),
    ("top_p negative", {"model": SENAB, "messages": HELLO, "top_p": -0.1}, 400, "invalid_request", "top_p"),
    ("temperature nan", {"model": SENAB, "messages": HELLO, "temperature": float("nan")}, 400, "invalid_request",
     "temperature"),
    ("penalty infinite", {"model": SENAB, "messages": HELLO, "presence_penalty": float("-inf")}, 400,
     "invalid_request", "presence_penalty"),
    ("max_tokens zero", {"model": SENAB, "messages": HELLO, "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
    ("max_tokens negative", {"model": SENAB, "messages": HELLO, "max_tokens": -5}, 400, "invalid_request",
     "max_tokens"),
    ("top_p above 1", {"model": SENAB, "messages": HELLO, "top_p": 1.5}, 400, "invalid_request", "top_p"),
    ("content number", {"model": SENAB, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request",
     "messages.0.content"),
    ("empty content list", {"model": SENAB, "messages": [{"role": "user", "content": []}]}, 400, "invalid_request",
     "messages.0.content"),
    ("lone surrogate name", {"model": SENAB, "messages": [{"role": "user", "content": "x", "name": "\ud800"}]},
     400, "invalid_request", "messages.0.name"),
    ("lone surrogate user", {"model": SENAB, "messages": HELLO, "user": "\udc00"}, 400, "invalid_request", "user"),
    ("text part without text", {"model": SENAB, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "invalid_request", "messages.0.content"),
    ("max_tokens over cap", {"model": SENAB, "messages": HELLO, "max_tokens": 201}, 400, "invalid_request",
     "max_tokens"),
    ("five stops", {"model": SENAB, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request",
     "stop"),
    ("tools", {"model": SENAB, "messages": HELLO, "tools": [{"type": "function"}]}, 400, "invalid_request", "tools"),
    ("ends with assistant", {"model": SENAB, "messages": HELLO + [{"role": "assistant", "content": "x"}]}, 400,
     "invalid_request", "messages.1.role"),
    ("only system", {"model": SENAB, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request",
     "messages.0.role"),
    ("lone surrogate", {"model": SENAB, "messages": [{"role": "user", "content": "a\ud800b"}]}, 400,
     "invalid_request", "messages.0.content"),
    ("lone surrogate stop", {"model": SENAB, "messages": HELLO, "stop": ["\udfff"]}, 400, "invalid_request", "stop"),
    ("seed beyond 64 bits", {"model": SENAB, "messages": HELLO, "seed": 2**64}, 400, "invalid_request", "seed"),
    ("response_format string", {"model": SENAB, "messages": HELLO, "response_format": "json_object"}, 400,
     "invalid_request", "response_format"),
    ("stop not a string", {"model": SENAB, "messages": HELLO, "stop": [1]}, 400, "invalid_request", "stop"),
    ("dot session id", {"model": SENAB, "messages": HELLO, "session_id": ".."}, 400, "invalid_request",
     "session_id"),
    ("unknown model", {"model": "gpt-4o", "messages": HELLO}, 404, "model_not_found", "model"),
    ("bad session id", {"model": SENAB, "messages": HELLO, "session_id": "a b{c}"}, 400, "invalid_request",
     "session_id"),
    ("long session id", {"model": SENAB, "messages": HELLO, "session_id": "x" * 129}, 400, "invalid_request",
     "session_id"),
    ("prompt over context", {"model": SENAB, "messages": [{"role": "user", "content": "Hello, world! " * 200}]},
     400, "context_length_exceeded", "messages"),
    ("prompt plus max_tokens over context", {"model": SENAB, "max_tokens": 200,
                                             "messages": [{"role": "user", "content": "Hello, world! " * 10}]},
     400, "context_length_exceeded", "max_tokens"),
]


@pytest.mark.parametrize("body, status, code, param", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_table(live_server, body, status, code, param):
    # json.dumps escapes non-ASCII, so a lone surrogate travels as "\ud800" as a client would send it.
    response = live_server.client.post("/v1/chat/completions", content=json.dumps(body),
                                       headers={"Content-Type": "application/json"})
    assert_error(response, status, code, param)


@pytest.mark.parametrize("field, value", [("temperature", 1e-40), ("top_p", 1e-46), ("top_p", 0), ("seed", -(2**63)),
                                          ("top_k", 10**6)])
def test_extreme_but_valid_sampling(live_server, field, value):
    response = live_server.chat(HELLO, model=TINY, max_tokens=3, **{field: value})
    assert response.status_code == 200, response.text


def test_range_error_names_the_value(live_server):
    error = assert_error(live_server.chat(HELLO, temperature=2.5), 400, "invalid_request", "temperature")

    assert "less than or equal to 2" in error["message"]
    assert "(got 2.5)" in error["message"]


def test_nan_error_says_finite(live_server):
    response = live_server.client.post("/v1/chat/completions", content=b'{"model": "%s", "messages": [{"role": '
                                       b'"user", "content": "Hi"}], "top_p": NaN}' % SENAB.encode(),
                                       headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request", "top_p")

    assert "finite number" in error["message"]


@pytest.mark.parametrize("query, param", [({"limit": 0}, "limit"), ({"since": -1}, "since")])
def test_trajectory_query_validation(live_server, query, param):
    session_id = live_server.chat(HELLO).headers["X-Session-Id"]
    assert_error(live_server.client.get(f"/sessions/{session_id}/trajectory", params=query), 400,
                 "invalid_request", param)


def test_retry_is_validated_first(live_server):
    live_server.chat(HELLO, session_id="retry-validated")
    response = live_server.chat(HELLO, session_id="retry-validated", max_tokens=10**9)

    assert_error(response, 400, "invalid_request", "max_tokens")
    live_server.client.delete("/sessions/retry-validated")


def test_invalid_json(live_server):
    response = live_server.client.post("/v1/chat/completions", content=b'{"model": ',
                                       headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request", None)
    assert "JSON" in error["message"]


def test_body_not_utf8(live_server):
    response = live_server.client.post("/v1/chat/completions", content=b'{"model": "\xff\xfe"}',
                                       headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "invalid_request", None)
    assert "UTF-8" in error["message"]


def test_body_too_large(live_server):
    body = {"model": SENAB, "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert_error(live_server.client.post("/v1/chat/completions", json=body), 413, "payload_too_large")


@pytest.mark.parametrize("method, path", [("GET", "/sessions/nope/state"), ("GET", "/sessions/nope/trajectory"),
                                          ("POST", "/sessions/nope/reset"), ("DELETE", "/sessions/nope")])
def test_unknown_session_endpoints(live_server, method, path):
    assert_error(live_server.client.request(method, path), 404, "session_not_found")


def test_invalid_session_id_on_state_endpoint(live_server):
    assert_error(live_server.client.get("/sessions/" + "y" * 129 + "/state"), 400, "invalid_request")


def test_record_from_other_checkpoint_rejected(live_server, redis_url):
    foreign = SessionRecord.start("ffffffffffffffff", np.zeros(32, np.float32)).encode()
    asyncio.run(_write_record(redis_url, live_server, "foreign-session", foreign))

    state = live_server.client.get("/sessions/foreign-session/state")
    chat = live_server.chat(HELLO, session_id="foreign-session")
    stored = asyncio.run(_read_record(redis_url, live_server, "foreign-session"))
    reset = live_server.client.post("/sessions/foreign-session/reset")
    after = live_server.chat(HELLO, session_id="foreign-session")

    assert "reset" in assert_error(state, 409, "state_invalid")["message"]
    assert_error(chat, 409, "state_invalid")
    assert stored == foreign
    assert reset.status_code == 200
    assert after.status_code == 200
    live_server.client.delete("/sessions/foreign-session")


def test_damaged_redis_keys_rejected_and_reset_repairs(live_server, redis_url, redis_prefix):
    import redis

    client = redis.Redis.from_url(redis_url)
    session_id = "damaged-session"
    state_key = f"{redis_prefix}:{{default:{session_id}}}:state"
    trajectory_key = f"{redis_prefix}:{{default:{session_id}}}:trajectory"
    assert live_server.chat(HELLO, session_id=session_id).status_code == 200

    client.hset(state_key, "v", "abc")
    bad_version = live_server.client.get(f"/sessions/{session_id}/state")
    repaired = live_server.client.post(f"/sessions/{session_id}/reset")
    client.xadd(trajectory_key, {"t": "abc", "p": "x"})
    bad_point = live_server.client.get(f"/sessions/{session_id}/trajectory")
    client.delete(trajectory_key)
    client.set(trajectory_key, "x")
    wrong_type = live_server.chat([{"role": "user", "content": "next"}], session_id=session_id)
    turn_after = SessionRecord.decode(client.hget(state_key, "r")).turn
    client.delete(state_key, trajectory_key)
    client.close()

    assert_error(bad_version, 409, "state_invalid")
    assert repaired.status_code == 200
    assert_error(bad_point, 409, "state_invalid")
    assert_error(wrong_type, 409, "state_invalid")
    assert turn_after == 0


@pytest.mark.parametrize("damage", ["state-string", "state-list", "replies-string", "version-negative",
                                    "version-underscore", "version-huge"])
def test_foreign_keys_rejected_before_generation(live_server, redis_url, redis_prefix, damage):
    import redis

    client = redis.Redis.from_url(redis_url)
    session_id = f"foreign-{damage}"
    keys = {name: f"{redis_prefix}:{{default:{session_id}}}:{name}" for name in ("state", "replies")}
    assert live_server.chat(HELLO, session_id=session_id).status_code == 200
    kind, _, value = damage.partition("-")
    if kind == "version":
        client.hset(keys["state"], "v", {"negative": "-1", "underscore": "1_0", "huge": str(2**60)}[value])
    else:
        client.delete(keys[kind])
        if value == "string":
            client.set(keys[kind], "x")
        else:
            client.rpush(keys[kind], "x")
    headers = {"Idempotency-Key": "next-turn"} if kind == "replies" else {}
    chat = live_server.client.post("/v1/chat/completions", headers={"X-Session-Id": session_id, **headers},
                                   json={"model": SENAB, "messages": [{"role": "user", "content": "next"}]})
    state = live_server.client.get(f"/sessions/{session_id}/state")
    reset = live_server.client.post(f"/sessions/{session_id}/reset")
    after = live_server.chat(HELLO, session_id=session_id)
    live_server.client.delete(f"/sessions/{session_id}")
    client.close()

    message = assert_error(chat, 409, "state_invalid")["message"]
    assert session_id in message
    assert "reset" in message
    if kind != "replies":  # the state itself is fine when only the replies key is damaged
        assert_error(state, 409, "state_invalid")
    assert reset.status_code == 200
    assert after.status_code == 200


async def _write_record(redis_url: str, live_server, session_id: str, record: bytes) -> None:
    from app.store import RedisStateStore

    store = RedisStateStore(redis_url, prefix=live_server.store.prefix)
    await store.commit("default", session_id, expected_version=0, record=record)
    await store.close()


async def _read_record(redis_url: str, live_server, session_id: str) -> bytes:
    from app.store import RedisStateStore

    store = RedisStateStore(redis_url, prefix=live_server.store.prefix)
    stored = await store.load("default", session_id)
    await store.close()
    return stored.record


def test_openai_sdk_non_streaming(live_server):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused")
    completion = client.chat.completions.create(model=SENAB, messages=HELLO, max_tokens=12,
                                                extra_headers={"X-Session-Id": "sdk-session"})

    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    assert completion.model_extra["senab"]["session_id"] == "sdk-session"
    assert completion.model_extra["senab"]["turn"] == 1
    live_server.client.delete("/sessions/sdk-session")


def test_openai_sdk_streaming(live_server):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model=SENAB, messages=HELLO, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model=SENAB, messages=HELLO, max_tokens=12)

    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_openai_sdk_errors(live_server):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SENAB, messages=HELLO, n=3)

    assert not_found.value.code == "model_not_found"
    assert bad.value.param == "n"


def test_store_down_gives_503(tiny_served):
    from app.config import Settings
    from app.main import create_app
    from app.store import RedisStateStore
    from tests.app.conftest import run_server
    from tests.conftest import free_port

    import httpx

    store = RedisStateStore(f"redis://:secretpw@127.0.0.1:{free_port()}/0")
    port = free_port()
    server, thread = run_server(create_app(Settings(default_temperature=0), served=tiny_served, store=store), port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            ready = client.get("/readyz")
            chat = client.post("/v1/chat/completions", json={"model": SENAB, "messages": HELLO})
            state = client.get("/sessions/abc/state")
            health = client.get("/healthz")
    finally:
        server.should_exit = True
        thread.join(10)

    assert ready.status_code == 503
    assert_error(chat, 503, "store_unavailable")
    assert_error(state, 503, "store_unavailable")
    assert "secretpw" not in chat.text
    assert health.status_code == 200


def test_metrics_are_scraped(live_server):
    before = scrape_metrics(live_server.client)
    reply = live_server.chat(HELLO, max_tokens=5)
    assert reply.status_code == 200, reply.text
    missing = live_server.client.get("/sessions/no-such-session/state")
    assert missing.status_code == 404
    after = scrape_metrics(live_server.client)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    body = reply.json()
    usage = body["usage"]
    reason = body["choices"][0]["finish_reason"]
    assert delta("senab:request_success_total", model=SENAB, finished_reason=reason) == 1
    assert delta("senab:prompt_tokens_total", model=SENAB) == usage["prompt_tokens"]
    assert delta("senab:generation_tokens_total", model=SENAB) == usage["completion_tokens"]
    assert delta("senab:e2e_request_latency_seconds_count", model=SENAB) == 1
    if body["choices"][0]["message"]["content"]:
        assert delta("senab:time_to_first_token_seconds_count", model=SENAB) == 1
    assert delta("senab:http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("senab:http_requests_total", endpoint="/sessions/{session_id}/state", status="404") == 1
    assert delta("senab:store_operation_seconds_count", operation="load") >= 1
    assert delta("senab:store_operation_seconds_count", operation="commit") == 1
    assert delta("senab:batch_size_count") >= 1
    assert after[("senab:num_requests_running", frozenset())] == 0
    assert after[("senab:num_requests_waiting", frozenset())] == 0


@pytest.mark.parametrize("path, label", [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/sessions/abc", "/sessions/{session_id}"),
    ("/sessions/abc/trajectory", "/sessions/{session_id}/trajectory"),
    ("/sessions/abc/unknown", "other"),
    ("/sessions/a/b/state", "other"),
    ("/favicon.ico", "other"),
])
def test_metric_endpoint_labels_stay_few(path, label):
    from app.metrics import endpoint_label

    assert endpoint_label(path) == label


def test_ui_page_and_its_files_are_served(live_server):
    redirect = live_server.client.get("/ui", follow_redirects=False)
    page = live_server.client.get("/ui/")
    script = live_server.client.get("/ui/app.js")
    style = live_server.client.get("/ui/style.css")

    assert redirect.status_code == 307
    assert redirect.headers["location"] == "/ui/"
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for control in ('id="prompt"', 'id="api-key"', 'id="session-id"', 'id="reset-session"', 'id="chart"',
                    'src="app.js"', 'role="status"'):
        assert control in page.text
    assert script.status_code == 200
    assert "/sessions/${encodeURIComponent(sessionId)}/events" in script.text
    assert style.status_code == 200


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_ui_script_parses():
    script = Path(__file__).resolve().parents[2] / "app" / "static" / "ui" / "app.js"
    result = subprocess.run(["node", "--check", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("text", ['"', "\\", "a\nb\tc", "é", "😀", "\x00", "</script>", "", "\u2028"])
def test_content_event_matches_model_dump(text):
    from app.protocol import ChatCompletionChunk, ChunkChoice, DeltaMessage
    from app.routes.chat import _PLACEHOLDER, _event, content_event_builder

    def chunk(content: str) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-1", created=1, model="m+senab",
                                   choices=[ChunkChoice(delta=DeltaMessage(content=content))])

    event = content_event_builder(chunk(_PLACEHOLDER))(text)
    assert event == _event(chunk(text))
    assert json.loads(event.removeprefix("data: "))["choices"][0]["delta"]["content"] == text
