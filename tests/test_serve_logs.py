"""`senab serve` with SENAB_LOG_FORMAT=json: every line is a JSON object, with the request fields."""

from __future__ import annotations

import json
import uuid

import httpx

from tests.app.conftest import delete_prefix
from tests.helpers import ServerProcess, make_tiny_llama


def test_json_logs_carry_request_fields(tmp_path, redis_url):
    make_tiny_llama(tmp_path / "tiny-model", seed=0)
    prefix = f"senab-logs-{uuid.uuid4().hex}"
    env = {"SENAB_MODEL": str(tmp_path / "tiny-model"), "REDIS_URL": redis_url, "SENAB_REDIS_PREFIX": prefix,
           "SENAB_LOG_FORMAT": "json", "SENAB_MAX_TOKENS_DEFAULT": "4", "SENAB_API_KEYS": "k" * 24}
    server = ServerProcess(env, tmp_path / "server.log")
    try:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                              headers={"Authorization": "Bearer " + "k" * 24, "X-Session-Id": "logged"},
                              json={"model": "tiny-model+senab", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        server.stop()
        delete_prefix(redis_url, prefix)

    text = (tmp_path / "server.log").read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [e for e in entries if e.get("path") == "/v1/chat/completions"]
    ready = next(e["message"] for e in entries if "ready in" in e["message"])

    assert response.status_code == 200
    assert access[0]["status"] == 200
    assert access[0]["session_id"] == "logged"
    assert access[0]["request_id"] == response.headers["X-Request-Id"]
    assert access[0]["completion_tokens"] == response.json()["usage"]["completion_tokens"]
    assert access[0]["latency_ms"] > 0
    assert len(access) == 1
    assert "uvicorn.access" not in {e["logger"] for e in entries}  # one access line per request
    assert "(session logged," in access[0]["message"]
    for word in ("tiny-model", "cpu", "checkpoint"):
        assert word in ready
    assert "k" * 24 not in text
    assert "hi" not in [e["message"] for e in entries]
