"""Shared fixtures: a Redis URL for tests and a factory for private redis-server processes.

All test traffic goes to 127.0.0.1. The `redis_url` fixture uses the Redis at
127.0.0.1:6379 if one replies to PING, and otherwise starts `redis-server` on a free port.
Tests that write to a shared Redis must use their own key prefix and delete their keys.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_REDIS_PORT = 6379
_STARTUP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when checked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_replies(port: int) -> bool:
    """Return True if a Redis server on 127.0.0.1:`port` replies to PING."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5,
                         socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class RedisServer:
    """A `redis-server` child process on 127.0.0.1; with `data_dir`, an append-only file
    there (fsync on every write) keeps the data across `stop` and `start`."""

    port: int
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    data_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it replies to PING."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not on PATH. Install Redis 7 (for example "
                        "`apt-get install redis-server`) or start Redis on 127.0.0.1:6379.")
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no",
             *(["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
               if self.data_dir else ["--appendonly", "no"])],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                output = self.log.read().decode(errors="replace").strip()
                pytest.fail(f"redis-server on port {self.port} exited with code "
                            f"{self.process.returncode}: {output}")
            if redis_replies(self.port):
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server on port {self.port} did not reply to PING within "
                    f"{_STARTUP_TIMEOUT_SECONDS:.0f} s")

    def stop(self) -> None:
        """Terminate the server and wait for it to exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis on 127.0.0.1: the one on port 6379 if it replies, else a private one."""
    if redis_replies(DEFAULT_REDIS_PORT):
        yield f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0"
        return
    server = RedisServer(port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[[], RedisServer]]:
    """Factory for private, already started redis-server processes, stopped after the test."""
    servers: list[RedisServer] = []

    def start_server() -> RedisServer:
        server = RedisServer(port=free_port())
        servers.append(server)
        server.start()
        return server

    yield start_server
    for server in servers:
        server.stop()
