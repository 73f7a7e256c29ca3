"""Redis state store: one hash and one stream per session, written by Lua scripts.

Key layout for tenant T and session S under prefix P:

- `P:{T:S}:state` is a hash with fields `v` (version, integer), `r` (record bytes) and
  `c` (id of the commit or reset that wrote it, for retried calls).
- `P:{T:S}:trajectory` is a stream whose entries have fields `t` (turn) and `p` (point bytes).
- `P:{T:S}:replies` is a hash from idempotency id to `<turn>\n<reply bytes>`.

The braces are a Redis Cluster hash tag, so the keys of a session map to one slot and a
single script or MULTI can touch all of them. Commits and resets are one Lua script each, so the
check, the writes and the TTL refresh happen atomically.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import StateInvalid, StoreUnavailable
from app.store.base import (DEFAULT_TRAJECTORY_MAX, DEFAULT_TTL_SECONDS, IDEMPOTENT_REPLIES_MAX, StateStore,
                            StoredSession)

logger = logging.getLogger(__name__)

SOCKET_TIMEOUT_SECONDS = 2.0
HEALTH_CHECK_INTERVAL_SECONDS = 30
# Connection and timeout errors are retried once on a fresh connection. This covers a pooled
# connection that went stale while Redis restarted. More retries would only delay the 503
# while Redis is down.
RETRIES = 1
_FAILURE_LOG_INTERVAL_SECONDS = 10.0

# Stores one reply in the replies hash and drops the oldest turns' replies beyond `limit`.
_STORE_REPLY_FUNCTION = """
local function store_reply(key, id, turn, reply, limit)
  redis.call('HSET', key, id, turn .. '\\n' .. reply)
  while redis.call('HLEN', key) > limit do
    local entries = redis.call('HGETALL', key)
    local oldest, oldest_turn = nil, nil
    for i = 1, #entries, 2 do
      local entry_turn = tonumber(string.match(entries[i + 1], '^(%d+)\\n')) or 0
      if oldest_turn == nil or entry_turn < oldest_turn then oldest, oldest_turn = entries[i], entry_turn end
    end
    redis.call('HDEL', key, oldest)
  end
end
"""

# KEYS: state hash, trajectory stream, replies hash.
# ARGV: expected version, record, TTL in ms, commit id, "1" if a point is given, turn, point,
# trajectory_max, idempotency id ("" for none), reply, replies max. Returns {1, new version},
# {0, stored version} on a version mismatch, or {-1, 0} when the keys hold something this
# server did not write (a non-numeric version, a trajectory that is not a stream, replies
# that are not a hash).
# A call whose commit id is already stored at expected version + 1 is a retry of a call
# that was applied, so it returns success instead of a conflict.
# Redis does not roll back a script that fails half-way, so every check comes first and
# the XADD, the only write that can still fail, runs before the HSET.
_COMMIT_SCRIPT = _STORE_REPLY_FUNCTION + """
local stored = redis.call('HMGET', KEYS[1], 'v', 'c')
local current = 0
if stored[1] then
  current = tonumber(stored[1])
  if not current then return {-1, 0} end
end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'stream' then return {-1, 0} end
kind = redis.call('TYPE', KEYS[3])['ok']
if kind ~= 'none' and kind ~= 'hash' then return {-1, 0} end
local expected = tonumber(ARGV[1])
if current ~= expected then
  if current == expected + 1 and stored[2] == ARGV[4] then
    return {1, current}
  end
  return {0, current}
end
if current == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[8], '*', 't', ARGV[6], 'p', ARGV[7])
end
local version = current + 1
redis.call('HSET', KEYS[1], 'v', version, 'r', ARGV[2], 'c', ARGV[4])
if ARGV[9] ~= '' then
  store_reply(KEYS[3], ARGV[9], ARGV[6], ARGV[10], tonumber(ARGV[11]))
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return {1, version}
"""

# KEYS: state hash, trajectory stream, replies hash. ARGV: TTL in ms, idempotency id ("" for
# none). Returns {flat field list of the state hash, stored reply or nil}, or {-1} when the
# state or replies key is of another type, and refreshes the TTL of all three keys. One
# script instead of a MULTI pipeline, because the client parses one reply instead of six
# (0.27 against 0.44 ms p50 on a 2-core AMD EPYC).
_LOAD_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'hash' then return {-1} end
local fields = redis.call('HGETALL', KEYS[1])
local reply = false
if ARGV[2] ~= '' then
  kind = redis.call('TYPE', KEYS[3])['ok']
  if kind ~= 'none' and kind ~= 'hash' then return {-1} end
  reply = redis.call('HGET', KEYS[3], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return {fields, reply}
"""

# KEYS: state hash, replies hash. ARGV: idempotency id, turn, reply, replies max, TTL in ms.
# Returns 0 without writing when the session does not exist or its replies are not a hash.
_REMEMBER_SCRIPT = _STORE_REPLY_FUNCTION + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'hash' then return 0 end
store_reply(KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: state hash, trajectory stream, replies hash. ARGV: record, TTL in ms, reset id.
# Returns the new version, or the stored one if this reset id was already applied.
_RESET_SCRIPT = """
-- A state key of another type (not written by this server) is replaced, so reset repairs it.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then
  redis.call('DEL', KEYS[1])
end
local stored = redis.call('HMGET', KEYS[1], 'v', 'c')
-- A version that is not an integer from 0 to 2^53 - 1 (a damaged record) restarts the count,
-- so reset repairs it.
local current = tonumber(stored[1]) or 0
if current < 0 or current >= 9007199254740992 or current % 1 ~= 0 then
  current = 0
end
if stored[2] == ARGV[3] then
  return current
end
local version = current + 1
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'v', version, 'r', ARGV[1], 'c', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return version
"""


class RedisStateStore(StateStore):
    """`StateStore` on Redis 7 through a `redis.asyncio` connection pool.

    The trajectory is trimmed with exact `XADD MAXLEN trajectory_max`, not `MAXLEN ~`,
    so it never contains more than `trajectory_max` entries.

    Redis errors become `StoreUnavailable`, and a message never contains the password
    from the URL. Connections are opened lazily and broken ones are replaced at the next
    call, so the store recovers without a restart once Redis is back.
    """

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "senab",
                 ttl_seconds: int = DEFAULT_TTL_SECONDS,
                 trajectory_max: int = DEFAULT_TRAJECTORY_MAX) -> None:
        super().__init__(ttl_seconds=ttl_seconds, trajectory_max=trajectory_max)
        if not prefix or any(char in prefix for char in "{}*?[]\\ "):
            raise ValueError(f"invalid key prefix {prefix!r}: it must be non-empty and "
                             "must not contain braces, glob characters or spaces")
        self.prefix = prefix
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
            health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), RETRIES),
        )
        connection_kwargs = self._client.connection_pool.connection_kwargs
        self._address = (connection_kwargs.get("path")
                         or f"{connection_kwargs.get('host', 'localhost')}:"
                            f"{connection_kwargs.get('port', 6379)}")
        self._password: str | None = connection_kwargs.get("password") or None
        self._load_script = self._client.register_script(_LOAD_SCRIPT)
        self._commit_script = self._client.register_script(_COMMIT_SCRIPT)
        self._reset_script = self._client.register_script(_RESET_SCRIPT)
        self._remember_script = self._client.register_script(_REMEMBER_SCRIPT)
        self._consecutive_failures = 0
        self._unlogged_failures = 0
        self._last_warning_at: float | None = None

    def state_key(self, tenant: str, session_id: str) -> str:
        """Name of the hash that contains the session's version and record."""
        self._check_ids(tenant, session_id)
        return f"{self.prefix}:{{{tenant}:{session_id}}}:state"

    def trajectory_key(self, tenant: str, session_id: str) -> str:
        """Name of the stream that contains the session's trajectory."""
        self._check_ids(tenant, session_id)
        return f"{self.prefix}:{{{tenant}:{session_id}}}:trajectory"

    def replies_key(self, tenant: str, session_id: str) -> str:
        """Name of the hash that contains the replies kept for idempotent retries."""
        self._check_ids(tenant, session_id)
        return f"{self.prefix}:{{{tenant}:{session_id}}}:replies"

    def _keys(self, tenant: str, session_id: str) -> list[str]:
        return [self.state_key(tenant, session_id), self.trajectory_key(tenant, session_id),
                self.replies_key(tenant, session_id)]

    async def load(self, tenant: str, session_id: str, *,
                   idempotency_id: str | None = None) -> StoredSession | None:
        self._check_idempotency_id(idempotency_id)
        keys = self._keys(tenant, session_id)
        ttl_ms = self.ttl_seconds * 1000
        with self._translate_errors("load", session_id, write=False):
            result = await self._load_script(keys=keys, args=[ttl_ms, idempotency_id or ""])

        if result == [-1]:
            raise self._invalid(session_id, "a state or replies key of another Redis type")
        flat_fields, stored_reply = result
        if not flat_fields:
            return None
        fields = dict(zip(flat_fields[::2], flat_fields[1::2]))
        if b"v" not in fields or b"r" not in fields:
            raise self._invalid(session_id, "no version or record field")
        # Digits only, as the commit script's tonumber reads them, and below 2^53, where Lua's
        # numbers stop being exact integers.
        if not fields[b"v"].isdigit() or int(fields[b"v"]) >= 2**53:
            raise self._invalid(session_id, "a version field that is not an integer from 0 to 2^53 - 1")
        version = int(fields[b"v"])
        reply = None
        if stored_reply is not None:
            _, separator, reply = stored_reply.partition(b"\n")
            if not separator:
                raise self._invalid(session_id, "a stored reply without its turn")
        return StoredSession(record=fields[b"r"], version=version, idempotent_reply=reply)

    async def commit(self, tenant: str, session_id: str, *, expected_version: int,
                     record: bytes, point: bytes | None = None, turn: int | None = None,
                     idempotent: tuple[str, bytes] | None = None) -> int:
        self._check_commit_args(expected_version, point, turn, idempotent)
        keys = self._keys(tenant, session_id)
        has_point = point is not None
        args = [expected_version, record, self.ttl_seconds * 1000, uuid.uuid4().hex,
                "1" if has_point else "0", turn if turn is not None else 0,
                point if point is not None else b"", self.trajectory_max,
                idempotent[0] if idempotent else "", idempotent[1] if idempotent else b"", IDEMPOTENT_REPLIES_MAX]
        with self._translate_errors("commit", session_id, write=True):
            applied, version = await self._commit_script(keys=keys, args=args)

        if int(applied) == -1:
            raise self._invalid(session_id, "keys of another type or a non-integer version")
        if not applied:
            raise self._conflict(session_id, expected_version, int(version))
        return int(version)

    async def remember_reply(self, tenant: str, session_id: str, idempotency_id: str, *, turn: int,
                             reply: bytes) -> bool:
        self._check_idempotency_id(idempotency_id)
        keys = [self.state_key(tenant, session_id), self.replies_key(tenant, session_id)]
        args = [idempotency_id, turn, reply, IDEMPOTENT_REPLIES_MAX, self.ttl_seconds * 1000]
        with self._translate_errors("remember_reply", session_id, write=True):
            return bool(await self._remember_script(keys=keys, args=args))

    async def reset(self, tenant: str, session_id: str, record: bytes) -> int:
        keys = self._keys(tenant, session_id)
        args = [record, self.ttl_seconds * 1000, uuid.uuid4().hex]
        with self._translate_errors("reset", session_id, write=True):
            version = await self._reset_script(keys=keys, args=args)
        return int(version)

    async def delete(self, tenant: str, session_id: str) -> bool:
        keys = self._keys(tenant, session_id)
        with self._translate_errors("delete", session_id, write=True):
            async with self._client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.delete(key)
                deleted_state, *_ = await pipe.execute()
        return bool(deleted_state)

    async def trajectory(self, tenant: str, session_id: str, *, since: int | None = None,
                         limit: int | None = None) -> list[tuple[int, bytes]]:
        self._check_trajectory_args(limit)
        trajectory_key = self.trajectory_key(tenant, session_id)
        if limit == 0:
            return []
        # Turns are stream field values, not stream ids, so `since` is applied here. The
        # stream contains at most `trajectory_max` entries, which bounds this read.
        count = limit if since is None else None
        with self._translate_errors("trajectory", session_id, write=False):
            entries = await self._client.xrange(trajectory_key, count=count)

        try:
            points = [(int(fields[b"t"]), fields[b"p"]) for _, fields in entries]
        except (KeyError, ValueError):
            raise self._invalid(session_id, "a trajectory entry without an integer turn and a point") from None
        if since is not None:
            points = [entry for entry in points if entry[0] > since]
        return points if limit is None else points[:limit]

    async def last_turn(self, tenant: str, session_id: str) -> int:
        trajectory_key = self.trajectory_key(tenant, session_id)
        with self._translate_errors("last_turn", session_id, write=False):
            entries = await self._client.xrevrange(trajectory_key, count=1)
        if not entries:
            return 0
        try:
            return int(entries[0][1][b"t"])
        except (KeyError, ValueError):
            raise self._invalid(session_id, "a trajectory entry without an integer turn") from None

    def _invalid(self, session_id: str, what: str) -> StateInvalid:
        logger.warning("session %s in Redis at %s has %s", session_id, self._address, what)
        return StateInvalid(
            f"Session '{session_id}' in Redis at {self._address} has {what}, so it was not written by "
            f"this server. POST /sessions/{session_id}/reset or DELETE the session.", param="session_id")

    async def ping(self) -> None:
        with self._translate_errors("ping", None, write=False):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    @contextlib.contextmanager
    def _translate_errors(self, operation: str, session_id: str | None, *,
                          write: bool) -> Iterator[None]:
        """Turn a `RedisError` raised in the block into `StoreUnavailable` and log it."""
        try:
            yield
        except RedisError as exc:
            raise self._store_unavailable(exc, operation, session_id, write) from None
        if self._consecutive_failures:
            logger.info("Redis at %s is reachable again (consecutive failed requests: %d)",
                        self._address, self._consecutive_failures)
            self._consecutive_failures = 0
            self._unlogged_failures = 0
            self._last_warning_at = None

    def _store_unavailable(self, exc: RedisError, operation: str, session_id: str | None,
                           write: bool) -> StoreUnavailable:
        reason = str(exc).rstrip(". ") or type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        self._log_failure(operation, session_id, reason)

        if write:
            outcome = ("The write was not confirmed, so load the session to see whether it "
                       "was applied before retrying.")
        else:
            outcome = "The request changed nothing."
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return StoreUnavailable(
                f"Redis at {self._address} is unavailable: {reason}. Check REDIS_URL and "
                f"that Redis is running. {outcome}")
        return StoreUnavailable(
            f"Redis at {self._address} returned an error: {reason}. Check the Redis server "
            f"log. {outcome}")

    def _log_failure(self, operation: str, session_id: str | None, reason: str) -> None:
        """Log at most one warning per `_FAILURE_LOG_INTERVAL_SECONDS` while Redis fails."""
        now = time.monotonic()
        self._consecutive_failures += 1
        if (self._last_warning_at is not None
                and now - self._last_warning_at < _FAILURE_LOG_INTERVAL_SECONDS):
            self._unlogged_failures += 1
            return
        if self._unlogged_failures:
            logger.warning("Redis at %s failed during %s of session %s: %s "
                           "(%d failures since the previous warning were not logged)",
                           self._address, operation, session_id or "-", reason,
                           self._unlogged_failures)
        else:
            logger.warning("Redis at %s failed during %s of session %s: %s",
                           self._address, operation, session_id or "-", reason)
        self._last_warning_at = now
        self._unlogged_failures = 0
