"""Session state on top of a `StateStore`: start, load, commit a turn, reset, delete.

Records are decoded against the served checkpoint, so a record written under another
checkpoint, or a corrupt one, is rejected (409 `state_invalid`) instead of being used.
Commits are compare-and-set: a commit that finds a newer version re-reads the record and
applies the homeostasis update to it, at most `max_commit_attempts` times. A turn sent with
an idempotency key stores its reply with the commit, so a retry can return it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from dataclasses import dataclass

import numpy as np

from app.errors import SessionNotFound, StateConflict, StateInvalid
from app.metrics import Metrics
from app.store import StateStore, StoredSession
from senab.affect import ProbeWeights, read_affect
from senab.bridge import Checkpoint
from senab.state import MAX_TURN, Affect, RecordError, SessionRecord, TrajectoryPoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredReply:
    """A committed turn's reply as a retry returns it."""

    turn: int
    digest: str  # hex conversation digest of the request that produced it
    reply: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    affect: Affect  # after the turn

    @classmethod
    def from_record(cls, record: SessionRecord, affect: Affect) -> StoredReply:
        return cls(turn=record.turn, digest=record.last_digest.hex(), reply=record.last_reply,
                   finish_reason=record.last_finish_reason or "stop", prompt_tokens=record.last_prompt_tokens,
                   completion_tokens=record.last_completion_tokens, affect=affect)

    def encode(self) -> bytes:
        fields = {k: v for k, v in self.__dict__.items() if k != "affect"}
        return json.dumps({**fields, "affect": self.affect.__dict__}, ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> StoredReply:
        fields = json.loads(data)
        return cls(**{**fields, "affect": Affect(**fields["affect"])})


@dataclass
class LoadedSession:
    session_id: str
    record: SessionRecord
    version: int  # 0 when the session is not stored yet
    # The reply committed earlier under the idempotency id given to `load`, if any.
    idempotent: StoredReply | None = None


class SessionService:
    def __init__(self, store: StateStore, checkpoint: Checkpoint, *, max_commit_attempts: int = 5,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.checkpoint = checkpoint
        self.set_point = checkpoint.bridge.set_point.detach().float().cpu().numpy()
        self._probe = None if checkpoint.probe is None else ProbeWeights.of(checkpoint.probe)
        self.max_commit_attempts = max_commit_attempts
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    def lock(self, tenant: str, session_id: str) -> asyncio.Lock:
        """Return the in-process lock that serialises turns on one session."""
        key = (tenant, session_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    def affect(self, state: np.ndarray) -> Affect:
        """Return the affect at float32 precision, the precision trajectory points store."""
        affect = read_affect(state, self.set_point, arousal_scale=self.checkpoint.arousal_scale, probe=self._probe)
        return Affect(valence=None if affect.valence is None else float(np.float32(affect.valence)),
                      arousal=float(np.float32(affect.arousal)), distance=float(np.float32(affect.distance)))

    def _decode(self, session_id: str, stored: StoredSession) -> SessionRecord:
        try:
            return SessionRecord.decode(stored.record, checkpoint_id=self.checkpoint.checkpoint_id)
        except RecordError as exc:
            logger.warning("session %s has an unusable state record: %s", session_id, exc)
            raise StateInvalid(
                f"The stored state of session '{session_id}' cannot be used: {exc}. "
                f"POST /sessions/{session_id}/reset to restart it at the set-point, or DELETE it.",
                param="session_id",
            ) from None

    async def load(self, tenant: str, session_id: str, *,
                   idempotency_id: str | None = None) -> LoadedSession | None:
        with self.metrics.time_store("load"):
            stored = await self.store.load(tenant, session_id, idempotency_id=idempotency_id)
        if stored is None:
            return None
        idempotent = None
        if stored.idempotent_reply is not None:
            try:
                idempotent = StoredReply.decode(stored.idempotent_reply)
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("session %s has an unreadable stored reply: %s", session_id, exc)
                raise StateInvalid(
                    f"The reply stored for this Idempotency-Key on session '{session_id}' cannot be read. "
                    f"Retry with a new key, or POST /sessions/{session_id}/reset.", param="Idempotency-Key",
                ) from None
        return LoadedSession(session_id, self._decode(session_id, stored), stored.version, idempotent)

    def start(self, session_id: str) -> LoadedSession:
        """Return a session at the set-point that is not stored yet (version 0)."""
        return LoadedSession(session_id, SessionRecord.start(self.checkpoint.checkpoint_id, self.set_point), 0)

    async def load_or_start(self, tenant: str, session_id: str, *,
                            idempotency_id: str | None = None) -> LoadedSession:
        loaded = await self.load(tenant, session_id, idempotency_id=idempotency_id)
        return self.start(session_id) if loaded is None else loaded

    async def require(self, tenant: str, session_id: str) -> LoadedSession:
        loaded = await self.load(tenant, session_id)
        if loaded is None:
            raise SessionNotFound(f"Session '{session_id}' not found (it may have expired).", param="session_id")
        return loaded

    async def commit_turn(self, tenant: str, session: LoadedSession, *, readout: np.ndarray, digest: bytes,
                          reply: str, finish_reason: str, prompt_tokens: int,
                          completion_tokens: int, idempotency_id: str | None = None) -> SessionRecord:
        """Apply one completed turn to the stored state and append its trajectory point.

        With `idempotency_id`, the reply is stored under it in the same atomic commit.
        """
        current = session
        for attempt in range(1, self.max_commit_attempts + 1):
            record = current.record
            if attempt > 1 and (current.idempotent is not None
                                or (record.turn > 0 and record.last_digest == digest)):
                # Another replica committed this same request while it ran here: a retry
                # must not advance the state twice.
                logger.info("session %s: turn %d was committed concurrently by another request; not applying "
                            "it again", session.session_id, record.turn)
                return record
            if record.turn >= MAX_TURN:
                raise StateInvalid(f"Session '{session.session_id}' reached the maximum of {MAX_TURN} turns; "
                                   "reset or delete it.", param="session_id")
            now = time.time()
            state = self.checkpoint.homeostasis.update(record.state, readout, self.set_point)
            new = SessionRecord(
                checkpoint_id=self.checkpoint.checkpoint_id, state=state, turn=record.turn + 1, updated_at=now,
                last_digest=digest, last_reply=reply, last_finish_reason=finish_reason,
                last_prompt_tokens=prompt_tokens, last_completion_tokens=completion_tokens,
            )
            point = TrajectoryPoint(turn=new.turn, time=now, affect=self.affect(state), state=state)
            idempotent = None
            if idempotency_id is not None:
                stored = StoredReply.from_record(new, point.affect)
                idempotent = (idempotency_id, stored.encode())
            try:
                with self.metrics.time_store("commit", expected=(StateConflict,)):
                    await self.store.commit(tenant, session.session_id, expected_version=current.version,
                                            record=new.encode(), point=point.encode(), turn=new.turn,
                                            idempotent=idempotent)
                return new
            except StateConflict:
                logger.info("session %s: commit conflict on attempt %d, re-reading the state",
                            session.session_id, attempt)
                current = await self.load_or_start(tenant, session.session_id, idempotency_id=idempotency_id)
        raise StateConflict(
            f"Session '{session.session_id}' changed {self.max_commit_attempts} times while this turn was "
            "being committed; the turn was not saved. Retry the request.", param="session_id",
        )

    async def remember_reply(self, tenant: str, session_id: str, idempotency_id: str, reply: StoredReply) -> None:
        """Store a replayed turn's reply under a new idempotency id, so a retry with that key
        finds it even after later turns."""
        with self.metrics.time_store("commit"):
            await self.store.remember_reply(tenant, session_id, idempotency_id, turn=reply.turn,
                                            reply=reply.encode())

    async def reset(self, tenant: str, session_id: str) -> SessionRecord:
        """Put the session back at the set-point; this also repairs an unusable stored record."""
        try:
            exists = await self.store.load(tenant, session_id) is not None
        except StateInvalid:
            exists = True
        if not exists:
            raise SessionNotFound(f"Session '{session_id}' not found (it may have expired).", param="session_id")
        record = SessionRecord.start(self.checkpoint.checkpoint_id, self.set_point)
        await self.store.reset(tenant, session_id, record.encode())
        return record

    async def delete(self, tenant: str, session_id: str) -> None:
        if not await self.store.delete(tenant, session_id):
            raise SessionNotFound(f"Session '{session_id}' not found (it may have expired).", param="session_id")

    async def trajectory(self, tenant: str, session_id: str, *, since: int | None,
                         limit: int | None) -> list[TrajectoryPoint]:
        await self.require(tenant, session_id)
        return await self.points(tenant, session_id, since=since, limit=limit)

    async def points(self, tenant: str, session_id: str, *, since: int | None = None,
                     limit: int | None = None) -> list[TrajectoryPoint]:
        """Return decoded trajectory points without touching the session's idle TTL."""
        points = await self.store.trajectory(tenant, session_id, since=since, limit=limit)
        decoded = []
        for _, data in points:
            try:
                decoded.append(TrajectoryPoint.decode(data))
            except RecordError as exc:
                raise StateInvalid(f"A trajectory point of session '{session_id}' is corrupt: {exc}.",
                                   param="session_id") from None
        return decoded
