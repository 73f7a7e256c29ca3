"""The per-session state store contract shared by the Redis and in-process stores.

A session is identified by `(tenant, session_id)` and has three parts: an opaque record
with a version number, a trajectory of `(turn, point)` pairs, and the replies of its most
recent turns that carried an idempotency key. Writers use optimistic concurrency: they
load the record, then commit with the version they read, and a commit that finds another
version raises `StateConflict` and writes nothing.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import ClassVar

from app.errors import StateConflict

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_TRAJECTORY_MAX = 1000
# Replies kept per session for idempotent retries; a commit beyond this drops the oldest.
IDEMPOTENT_REPLIES_MAX = 16

_SESSION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDEMPOTENCY_ID_RE = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class StoredSession:
    """A session record as stored, with the version to pass to `StateStore.commit`."""

    record: bytes
    version: int
    # The reply stored under the idempotency id passed to `load`, if there is one.
    idempotent_reply: bytes | None = None


class StateStore(abc.ABC):
    """Versioned per-session storage with compare-and-set commits and an idle TTL.

    Every operation that takes `tenant` and `session_id` raises `ValueError` unless the
    tenant matches `[A-Za-z0-9_-]{1,64}` and the session id matches `[A-Za-z0-9._-]{1,128}`.
    Callers should validate ids first and report bad input themselves. The store checks
    again because the ids become part of storage keys.

    Each load, commit and reset sets the session to expire `ttl_seconds` later, so a session
    expires after that long without use. An expired session reads as absent.
    """

    name: ClassVar[str]

    def __init__(self, *, ttl_seconds: int = DEFAULT_TTL_SECONDS,
                 trajectory_max: int = DEFAULT_TRAJECTORY_MAX) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1, got {ttl_seconds}")
        if trajectory_max < 1:
            raise ValueError(f"trajectory_max must be at least 1, got {trajectory_max}")
        self.ttl_seconds = ttl_seconds
        self.trajectory_max = trajectory_max

    @abc.abstractmethod
    async def load(self, tenant: str, session_id: str, *,
                   idempotency_id: str | None = None) -> StoredSession | None:
        """Load a session and restart its idle TTL. Returns None if it does not exist.

        With `idempotency_id`, the reply stored under that id (see `commit`) comes back in
        `StoredSession.idempotent_reply`, read in the same atomic step as the record.
        """

    @abc.abstractmethod
    async def commit(self, tenant: str, session_id: str, *, expected_version: int,
                     record: bytes, point: bytes | None = None, turn: int | None = None,
                     idempotent: tuple[str, bytes] | None = None) -> int:
        """Replace the record if the stored version equals `expected_version`.

        `expected_version=0` means that the session must not exist yet. On success the
        record gets version `expected_version + 1`. If `point` is given, `(turn, point)` is
        appended to the trajectory and the oldest entries beyond `trajectory_max` are
        dropped. If `idempotent` is `(id, reply)`, the reply is stored under the id (which
        needs `turn`) and the oldest stored replies beyond `IDEMPOTENT_REPLIES_MAX` are
        dropped. Every part gets a fresh idle TTL. Returns the new version.

        Raises `StateConflict` without writing anything if the stored version differs, and
        `ValueError` if `point` or `idempotent` is given without `turn`, the id is not
        1-64 lowercase hex digits, or `expected_version` is negative.
        """

    @abc.abstractmethod
    async def remember_reply(self, tenant: str, session_id: str, idempotency_id: str, *, turn: int,
                             reply: bytes) -> bool:
        """Store `reply` under `idempotency_id` for an already committed `turn`, as `commit`
        does, without touching the record. Returns False (and stores nothing) if the session
        does not exist."""

    @abc.abstractmethod
    async def reset(self, tenant: str, session_id: str, record: bytes) -> int:
        """Replace the record unconditionally and clear the trajectory and stored replies.

        The new version is the old version plus 1, or 1 if the session did not exist, so a
        commit based on a version read before the reset raises `StateConflict`.
        Returns the new version.
        """

    @abc.abstractmethod
    async def delete(self, tenant: str, session_id: str) -> bool:
        """Delete the record, the trajectory and the stored replies. Returns True if the
        session existed.

        NOTE: the next commit with `expected_version=0` starts again at version 1, so a
        writer that read version N before the delete can succeed once the new session
        reaches version N again.
        """

    @abc.abstractmethod
    async def trajectory(self, tenant: str, session_id: str, *, since: int | None = None,
                         limit: int | None = None) -> list[tuple[int, bytes]]:
        """Return `(turn, point)` pairs, oldest first.

        With `since`, only pairs whose turn is greater than `since` are returned. With
        `limit`, at most the first `limit` of those are returned. A missing session has an
        empty trajectory. Reading the trajectory does not restart the idle TTL.
        """

    @abc.abstractmethod
    async def last_turn(self, tenant: str, session_id: str) -> int:
        """Return the turn of the newest trajectory point, 0 for an empty or missing trajectory.
        Like `trajectory`, it does not restart the idle TTL."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Check that the store is reachable. Raises `StoreUnavailable` if it is not."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. The store must not be used afterwards."""

    @staticmethod
    def _check_ids(tenant: str, session_id: str) -> None:
        if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
            raise ValueError(f"invalid tenant {tenant!r}: expected 1-64 characters "
                             "from A-Z, a-z, 0-9, '_' and '-'")
        if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
            raise ValueError(f"invalid session id {session_id!r}: expected 1-128 characters "
                             "from A-Z, a-z, 0-9, '.', '_' and '-'")

    @staticmethod
    def _check_idempotency_id(idempotency_id: str | None) -> None:
        if idempotency_id is not None and (not isinstance(idempotency_id, str)
                                           or not _IDEMPOTENCY_ID_RE.fullmatch(idempotency_id)):
            raise ValueError(f"invalid idempotency id {idempotency_id!r}: expected 1-64 lowercase hex digits")

    @classmethod
    def _check_commit_args(cls, expected_version: int, point: bytes | None, turn: int | None,
                           idempotent: tuple[str, bytes] | None = None) -> None:
        if expected_version < 0:
            raise ValueError(f"expected_version must be 0 or more, got {expected_version}")
        if point is not None and turn is None:
            raise ValueError("turn is missing: commit needs the turn number when point is given")
        if idempotent is not None:
            if turn is None:
                raise ValueError("turn is missing: commit needs the turn number when idempotent is given")
            cls._check_idempotency_id(idempotent[0])

    @staticmethod
    def _check_trajectory_args(limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")

    @staticmethod
    def _conflict(session_id: str, expected_version: int, found_version: int) -> StateConflict:
        found = (f"version {found_version}" if found_version
                 else "no session (version 0)")
        return StateConflict(
            f"Session '{session_id}' was changed by another request: expected version "
            f"{expected_version}, found {found}. Load the session again and retry the turn.",
            code="state_conflict")
