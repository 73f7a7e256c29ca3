"""Redis stopped and restarted under a live server; the stored state survives intact."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from app.config import Settings
from app.main import create_app
from app.store import RedisStateStore
from senab.state import SessionRecord
from tests.app.conftest import run_server
from tests.app.test_api import SENAB, assert_error
from tests.conftest import RedisServer, free_port


def chat(client: httpx.Client, content: str, **fields) -> httpx.Response:
    return client.post("/v1/chat/completions", headers={"X-Session-Id": "fault-session"},
                       json={"model": SENAB, "max_tokens": 4, "messages": [{"role": "user", "content": content}],
                             **fields})


async def load_directly(url: str):
    # A store of its own: the server's store keeps connections bound to the server's event loop.
    store = RedisStateStore(url, prefix="faults")
    try:
        return await store.load("default", "fault-session")
    finally:
        await store.close()


def test_redis_stopped_mid_run_then_back(tiny_served, tmp_path):
    redis_server = RedisServer(port=free_port(), data_dir=tmp_path)
    redis_server.start()
    store = RedisStateStore(redis_server.url, prefix="faults")
    app = create_app(Settings(default_temperature=0), served=tiny_served, store=store)
    port = free_port()
    server, thread = run_server(app, port)
    # Each forward pass sleeps, so Redis can be stopped while a reply is being decoded.
    slow = tiny_served.model.register_forward_pre_hook(lambda *args: time.sleep(0.02))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            first = chat(client, "first turn")
            before = client.get("/sessions/fault-session/state").json()

            with client.stream("POST", "/v1/chat/completions", headers={"X-Session-Id": "fault-session"},
                               json={"model": SENAB, "max_tokens": 60, "stream": True,
                                     "messages": [{"role": "user", "content": "second turn"}]}) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                redis_server.stop()
                events = [line for line in lines if line.startswith("data: ")]
            down_chat = chat(client, "while down")
            down_state = client.get("/sessions/fault-session/state")
            down_ready = client.get("/readyz")

            redis_server.start()
            stored = asyncio.run(load_directly(redis_server.url))
            back_ready = client.get("/readyz")
            back_chat = chat(client, "after")
            after = client.get("/sessions/fault-session/state").json()
            points = client.get("/sessions/fault-session/trajectory").json()["points"]
    finally:
        slow.remove()
        server.should_exit = True
        thread.join(10)
        redis_server.stop()

    assert first.status_code == 200
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "store_unavailable"
    assert events[-1] == "data: [DONE]"
    assert_error(down_chat, 503, "store_unavailable")
    assert_error(down_state, 503, "store_unavailable")
    assert down_ready.status_code == 503
    # The turn cut off by the outage left the first turn's record as it was.
    record = SessionRecord.decode(stored.record)
    assert record.turn == before["turn"] == 1
    assert stored.version == 1
    assert record.state.tolist() == before["state"]
    assert back_ready.status_code == 200
    assert back_chat.status_code == 200
    assert back_chat.json()["senab"]["turn"] == 2
    assert after["turn"] == 2
    assert [p["turn"] for p in points] == [1, 2]
