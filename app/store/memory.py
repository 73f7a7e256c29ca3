"""In-process state store for tests and single-process development servers.

State lives in this process only, so it is lost on restart and not shared between workers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from app.store.base import (DEFAULT_TRAJECTORY_MAX, DEFAULT_TTL_SECONDS, IDEMPOTENT_REPLIES_MAX, StateStore,
                            StoredSession)

_SWEEP_INTERVAL_MAX_SECONDS = 60.0


@dataclass
class _Session:
    version: int
    record: bytes
    expires_at: float
    trajectory: deque[tuple[int, bytes]] = field(default_factory=deque)
    replies: dict[str, bytes] = field(default_factory=dict)  # idempotency id -> reply, oldest first


class MemoryStateStore(StateStore):
    """`StateStore` kept in a dict and guarded by one `asyncio.Lock`.

    Expiry is lazy: an expired session reads as absent and is dropped when next touched.
    Commits and resets also drop every expired session, at most once per
    `min(ttl_seconds, 60)` seconds, so expired sessions that are never read again are freed
    by later writes. Times come from `time.monotonic`.
    """

    name = "memory"

    def __init__(self, *, ttl_seconds: int = DEFAULT_TTL_SECONDS,
                 trajectory_max: int = DEFAULT_TRAJECTORY_MAX) -> None:
        super().__init__(ttl_seconds=ttl_seconds, trajectory_max=trajectory_max)
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._lock = asyncio.Lock()
        self._sweep_interval = min(float(ttl_seconds), _SWEEP_INTERVAL_MAX_SECONDS)
        self._next_sweep_at = time.monotonic() + self._sweep_interval

    async def load(self, tenant: str, session_id: str, *,
                   idempotency_id: str | None = None) -> StoredSession | None:
        self._check_ids(tenant, session_id)
        self._check_idempotency_id(idempotency_id)
        async with self._lock:
            session = self._touch((tenant, session_id))
            if session is None:
                return None
            reply = session.replies.get(idempotency_id) if idempotency_id is not None else None
            return StoredSession(record=session.record, version=session.version, idempotent_reply=reply)

    async def commit(self, tenant: str, session_id: str, *, expected_version: int,
                     record: bytes, point: bytes | None = None, turn: int | None = None,
                     idempotent: tuple[str, bytes] | None = None) -> int:
        self._check_ids(tenant, session_id)
        self._check_commit_args(expected_version, point, turn, idempotent)
        async with self._lock:
            now = time.monotonic()
            self._sweep_if_due(now)
            key = (tenant, session_id)
            session = self._live_session(key, now)
            current_version = session.version if session is not None else 0
            if current_version != expected_version:
                raise self._conflict(session_id, expected_version, current_version)

            if session is None:
                session = _Session(version=0, record=b"", expires_at=now,
                                   trajectory=deque(maxlen=self.trajectory_max))
                self._sessions[key] = session
            session.version = expected_version + 1
            session.record = bytes(record)
            if point is not None and turn is not None:
                session.trajectory.append((turn, bytes(point)))
            if idempotent is not None:
                self._store_reply(session, *idempotent)
            session.expires_at = now + self.ttl_seconds
            return session.version

    async def remember_reply(self, tenant: str, session_id: str, idempotency_id: str, *, turn: int,
                             reply: bytes) -> bool:
        self._check_ids(tenant, session_id)
        self._check_idempotency_id(idempotency_id)
        async with self._lock:
            session = self._touch((tenant, session_id))
            if session is None:
                return False
            self._store_reply(session, idempotency_id, reply)
            return True

    def _touch(self, key: tuple[str, str]) -> _Session | None:
        """Return the live session under `key` with a fresh idle TTL, or None."""
        now = time.monotonic()
        session = self._live_session(key, now)
        if session is not None:
            session.expires_at = now + self.ttl_seconds
        return session

    @staticmethod
    def _store_reply(session: _Session, idempotency_id: str, reply: bytes) -> None:
        session.replies.pop(idempotency_id, None)
        session.replies[idempotency_id] = bytes(reply)
        while len(session.replies) > IDEMPOTENT_REPLIES_MAX:
            del session.replies[next(iter(session.replies))]

    async def reset(self, tenant: str, session_id: str, record: bytes) -> int:
        self._check_ids(tenant, session_id)
        async with self._lock:
            now = time.monotonic()
            self._sweep_if_due(now)
            key = (tenant, session_id)
            session = self._live_session(key, now)
            version = (session.version if session is not None else 0) + 1
            self._sessions[key] = _Session(version=version, record=bytes(record),
                                           expires_at=now + self.ttl_seconds,
                                           trajectory=deque(maxlen=self.trajectory_max))
            return version

    async def delete(self, tenant: str, session_id: str) -> bool:
        self._check_ids(tenant, session_id)
        async with self._lock:
            key = (tenant, session_id)
            existed = self._live_session(key, time.monotonic()) is not None
            self._sessions.pop(key, None)
            return existed

    async def trajectory(self, tenant: str, session_id: str, *, since: int | None = None,
                         limit: int | None = None) -> list[tuple[int, bytes]]:
        self._check_ids(tenant, session_id)
        self._check_trajectory_args(limit)
        async with self._lock:
            session = self._live_session((tenant, session_id), time.monotonic())
            if session is None:
                return []
            points = [entry for entry in session.trajectory if since is None or entry[0] > since]
        return points if limit is None else points[:limit]

    async def last_turn(self, tenant: str, session_id: str) -> int:
        self._check_ids(tenant, session_id)
        async with self._lock:
            session = self._live_session((tenant, session_id), time.monotonic())
            return session.trajectory[-1][0] if session is not None and session.trajectory else 0

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        async with self._lock:
            self._sessions.clear()

    def _live_session(self, key: tuple[str, str], now: float) -> _Session | None:
        """Return the session under `key`, dropping it first if it has expired."""
        session = self._sessions.get(key)
        if session is not None and session.expires_at <= now:
            del self._sessions[key]
            return None
        return session

    def _sweep_if_due(self, now: float) -> None:
        if now < self._next_sweep_at:
            return
        expired = [key for key, session in self._sessions.items() if session.expires_at <= now]
        for key in expired:
            del self._sessions[key]
        self._next_sweep_at = now + self._sweep_interval
