"""GET /sessions/{id}/events: one server-sent event per committed turn, resumable by id."""

from __future__ import annotations

import json
import threading
import uuid

import httpx

from tests.app.test_api import HELLO, assert_error


class EventReader:
    """Read a session's event stream in a thread until `count` events of interest arrived."""

    def __init__(self, url: str, session_id: str, count: int, **request) -> None:
        self.events: list[dict] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, session_id, count, request), daemon=True)
        self.thread.start()

    def _read(self, url: str, session_id: str, count: int, request: dict) -> None:
        event: dict = {}
        with httpx.stream("GET", f"{url}/sessions/{session_id}/events", timeout=30, **request) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith(("id: ", "event: ", "data: ")):
                    field, _, value = line.partition(": ")
                    event[field] = json.loads(value) if field == "data" else value
                elif not line and "event" in event:
                    self.events.append(event)
                    event = {}
                    if len(self.events) >= count:
                        break
        self.done.set()

    def wait(self) -> list[dict]:
        assert self.done.wait(30), f"events so far: {self.events}"
        return self.events


def test_turns_arrive_as_events_and_resume_by_id(live_server):
    session_id = f"events-{uuid.uuid4().hex}"
    live_server.chat(HELLO, session_id=session_id, max_tokens=3)  # turn 1, before watching
    reader = EventReader(live_server.url, session_id, 2, params={"since": 1})
    for text in ("second", "third"):
        live_server.chat([{"role": "user", "content": text}], session_id=session_id, max_tokens=3)
    events = reader.wait()
    resumed = EventReader(live_server.url, session_id, 2, headers={"Last-Event-ID": "1"}).wait()
    state = live_server.client.get(f"/sessions/{session_id}/state").json()

    assert [e["event"] for e in events] == ["turn", "turn"]
    assert [e["id"] for e in events] == ["2", "3"]
    assert events[-1]["data"]["state"] == state["state"]
    assert events[-1]["data"]["distance"] == state["distance"]
    assert [e["id"] for e in resumed] == ["2", "3"]

    reset_reader = EventReader(live_server.url, session_id, 2, params={"since": 3})
    live_server.client.post(f"/sessions/{session_id}/reset")
    live_server.chat(HELLO, session_id=session_id, max_tokens=3)
    after_reset = reset_reader.wait()
    live_server.client.delete(f"/sessions/{session_id}")

    assert [e["event"] for e in after_reset] == ["reset", "turn"]
    assert after_reset[1]["id"] == "1"


def test_events_of_unknown_session_or_bad_id(live_server):
    assert_error(live_server.client.get("/sessions/no-such-session/events"), 404, "session_not_found")
    session_id = f"events-bad-{uuid.uuid4().hex}"
    live_server.chat(HELLO, session_id=session_id, max_tokens=3)
    response = live_server.client.get(f"/sessions/{session_id}/events", headers={"Last-Event-ID": "abc"})
    live_server.client.delete(f"/sessions/{session_id}")

    assert_error(response, 400, "invalid_request", "Last-Event-ID")
