"""Per-session state storage: the `StateStore` contract and its Redis and in-process stores."""

from __future__ import annotations

from app.store.base import DEFAULT_TRAJECTORY_MAX, DEFAULT_TTL_SECONDS, StateStore, StoredSession
from app.store.memory import MemoryStateStore
from app.store.redis import RedisStateStore

__all__ = [
    "DEFAULT_TRAJECTORY_MAX",
    "DEFAULT_TTL_SECONDS",
    "MemoryStateStore",
    "RedisStateStore",
    "StateStore",
    "StoredSession",
    "create_store",
]


def create_store(redis_url: str | None, *, prefix: str = "senab",
                 ttl_seconds: int = DEFAULT_TTL_SECONDS,
                 trajectory_max: int = DEFAULT_TRAJECTORY_MAX) -> StateStore:
    """Create a `RedisStateStore` for `redis_url`, or a `MemoryStateStore` if it is empty.

    `prefix` applies to Redis keys only. No connection is opened here, so call `ping` to
    check that Redis is reachable.
    """
    if redis_url:
        return RedisStateStore(redis_url, prefix=prefix, ttl_seconds=ttl_seconds,
                               trajectory_max=trajectory_max)
    return MemoryStateStore(ttl_seconds=ttl_seconds, trajectory_max=trajectory_max)
