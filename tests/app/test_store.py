"""Contract tests for `StateStore`, run against the in-process store and a real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from app.errors import StateConflict, StoreUnavailable
from app.store import MemoryStateStore, RedisStateStore, StateStore, create_store
from tests.conftest import RedisServer, free_port

TENANT = "acme"
SESSION = "session-1"

StoreFactory = Callable[..., StateStore]


async def delete_prefixed_keys(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to this test. Its keys are deleted afterwards."""
    prefix = f"senab-test-{uuid.uuid4().hex}"
    yield prefix
    await delete_prefixed_keys(redis_url, prefix)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Factory for stores of the parametrized kind. All of them are closed afterwards."""
    url: str | None = None
    prefix = f"senab-test-{uuid.uuid4().hex}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    stores: list[StateStore] = []

    def make(*, ttl_seconds: int = 3600, trajectory_max: int = 100) -> StateStore:
        store: StateStore
        if url is not None:
            store = RedisStateStore(url, prefix=prefix, ttl_seconds=ttl_seconds,
                                    trajectory_max=trajectory_max)
        else:
            store = MemoryStateStore(ttl_seconds=ttl_seconds, trajectory_max=trajectory_max)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    if url is not None:
        await delete_prefixed_keys(url, prefix)


@pytest.fixture
def store(make_store: StoreFactory) -> StateStore:
    return make_store()


async def commit_points(store: StateStore, turns: range, *, session_id: str = SESSION) -> int:
    """Commit one point per turn, starting from the stored version. Returns the last version."""
    stored = await store.load(TENANT, session_id)
    version = stored.version if stored else 0
    for turn in turns:
        version = await store.commit(TENANT, session_id, expected_version=version,
                                     record=f"record {turn}".encode(),
                                     point=f"point {turn}".encode(), turn=turn)
    return version


# Contract tests, run against both stores.


async def test_load_missing_session_returns_none(store: StateStore) -> None:
    assert await store.load(TENANT, SESSION) is None


async def test_first_commit_creates_version_one(store: StateStore) -> None:
    version = await store.commit(TENANT, SESSION, expected_version=0, record=b"first")

    stored = await store.load(TENANT, SESSION)
    assert version == 1
    assert stored is not None
    assert stored.version == 1
    assert stored.record == b"first"


async def test_commit_increments_version(store: StateStore) -> None:
    await store.commit(TENANT, SESSION, expected_version=0, record=b"first")

    version = await store.commit(TENANT, SESSION, expected_version=1, record=b"second")

    stored = await store.load(TENANT, SESSION)
    assert version == 2
    assert stored is not None
    assert stored.version == 2
    assert stored.record == b"second"


async def test_stale_commit_conflicts_and_writes_nothing(store: StateStore) -> None:
    await commit_points(store, range(1, 3))

    with pytest.raises(StateConflict) as raised:
        await store.commit(TENANT, SESSION, expected_version=1, record=b"stale",
                           point=b"stale point", turn=3)

    stored = await store.load(TENANT, SESSION)
    assert stored is not None
    assert stored.version == 2
    assert stored.record == b"record 2"
    assert await store.trajectory(TENANT, SESSION) == [(1, b"point 1"), (2, b"point 2")]
    assert raised.value.code == "state_conflict"
    assert SESSION in raised.value.message
    assert "expected version 1" in raised.value.message
    assert "found version 2" in raised.value.message


async def test_create_commit_on_existing_session_conflicts(store: StateStore) -> None:
    await store.commit(TENANT, SESSION, expected_version=0, record=b"first")

    with pytest.raises(StateConflict):
        await store.commit(TENANT, SESSION, expected_version=0, record=b"second")

    stored = await store.load(TENANT, SESSION)
    assert stored is not None
    assert stored.record == b"first"


async def test_commit_on_missing_session_conflicts(store: StateStore) -> None:
    with pytest.raises(StateConflict) as raised:
        await store.commit(TENANT, SESSION, expected_version=3, record=b"orphan")

    assert await store.load(TENANT, SESSION) is None
    assert "found no session" in raised.value.message


async def test_commit_point_without_turn_raises(store: StateStore) -> None:
    with pytest.raises(ValueError):
        await store.commit(TENANT, SESSION, expected_version=0, record=b"r", point=b"p")

    assert await store.load(TENANT, SESSION) is None


async def test_trajectory_is_oldest_first(store: StateStore) -> None:
    await commit_points(store, range(1, 5))

    assert await store.trajectory(TENANT, SESSION) == [
        (1, b"point 1"), (2, b"point 2"), (3, b"point 3"), (4, b"point 4")]


async def test_commit_without_point_keeps_trajectory(store: StateStore) -> None:
    version = await commit_points(store, range(1, 3))

    await store.commit(TENANT, SESSION, expected_version=version, record=b"no point")

    assert [turn for turn, _ in await store.trajectory(TENANT, SESSION)] == [1, 2]


async def test_trajectory_since(store: StateStore) -> None:
    await commit_points(store, range(1, 6))

    turns = [turn for turn, _ in await store.trajectory(TENANT, SESSION, since=3)]

    assert turns == [4, 5]


async def test_trajectory_limit(store: StateStore) -> None:
    await commit_points(store, range(1, 6))

    turns = [turn for turn, _ in await store.trajectory(TENANT, SESSION, limit=2)]

    assert turns == [1, 2]


async def test_trajectory_since_and_limit(store: StateStore) -> None:
    await commit_points(store, range(1, 8))

    turns = [turn for turn, _ in await store.trajectory(TENANT, SESSION, since=2, limit=3)]

    assert turns == [3, 4, 5]


async def test_trajectory_limit_zero_is_empty(store: StateStore) -> None:
    await commit_points(store, range(1, 3))

    assert await store.trajectory(TENANT, SESSION, limit=0) == []


async def test_last_turn(store: StateStore) -> None:
    assert await store.last_turn(TENANT, SESSION) == 0
    await commit_points(store, range(1, 4))
    assert await store.last_turn(TENANT, SESSION) == 3
    await store.reset(TENANT, SESSION, b"fresh")
    assert await store.last_turn(TENANT, SESSION) == 0


async def test_trajectory_of_missing_session_is_empty(store: StateStore) -> None:
    assert await store.trajectory(TENANT, SESSION) == []


async def test_trajectory_cap_keeps_newest(make_store: StoreFactory) -> None:
    store = make_store(trajectory_max=5)

    await commit_points(store, range(1, 9))

    trajectory = await store.trajectory(TENANT, SESSION)
    assert [turn for turn, _ in trajectory] == [4, 5, 6, 7, 8]
    assert trajectory[0] == (4, b"point 4")


async def test_reset_clears_trajectory(store: StateStore) -> None:
    await commit_points(store, range(1, 4))

    await store.reset(TENANT, SESSION, b"fresh")

    stored = await store.load(TENANT, SESSION)
    assert stored is not None
    assert stored.record == b"fresh"
    assert await store.trajectory(TENANT, SESSION) == []


async def test_reset_keeps_version_monotonic(store: StateStore) -> None:
    version_before = await commit_points(store, range(1, 4))

    version_after = await store.reset(TENANT, SESSION, b"fresh")

    stored = await store.load(TENANT, SESSION)
    assert version_before == 3
    assert version_after == 4
    assert stored is not None
    assert stored.version == 4


async def test_commit_after_reset_with_old_version_conflicts(store: StateStore) -> None:
    version_before = await commit_points(store, range(1, 3))
    await store.reset(TENANT, SESSION, b"fresh")

    with pytest.raises(StateConflict):
        await store.commit(TENANT, SESSION, expected_version=version_before, record=b"late",
                           point=b"late point", turn=3)

    stored = await store.load(TENANT, SESSION)
    assert stored is not None
    assert stored.record == b"fresh"
    assert await store.trajectory(TENANT, SESSION) == []


async def test_reset_of_missing_session_creates_version_one(store: StateStore) -> None:
    assert await store.reset(TENANT, SESSION, b"fresh") == 1


async def test_delete_existing_then_missing(store: StateStore) -> None:
    await commit_points(store, range(1, 3))

    first = await store.delete(TENANT, SESSION)
    second = await store.delete(TENANT, SESSION)

    assert first is True
    assert second is False
    assert await store.load(TENANT, SESSION) is None
    assert await store.trajectory(TENANT, SESSION) == []


async def test_tenants_are_isolated(store: StateStore) -> None:
    await store.commit("tenant-a", SESSION, expected_version=0, record=b"a",
                       point=b"point a", turn=1)
    await store.commit("tenant-b", SESSION, expected_version=0, record=b"b")

    stored_a = await store.load("tenant-a", SESSION)
    stored_b = await store.load("tenant-b", SESSION)
    assert stored_a is not None
    assert stored_b is not None
    assert stored_a.record == b"a"
    assert stored_b.record == b"b"
    assert await store.trajectory("tenant-b", SESSION) == []
    assert await store.delete("tenant-b", SESSION) is True
    assert await store.load("tenant-a", SESSION) is not None


async def test_session_expires_after_ttl(make_store: StoreFactory) -> None:
    store = make_store(ttl_seconds=1)
    await commit_points(store, range(1, 3))

    await asyncio.sleep(1.5)

    assert await store.load(TENANT, SESSION) is None
    assert await store.trajectory(TENANT, SESSION) == []


async def test_load_refreshes_ttl(make_store: StoreFactory) -> None:
    store = make_store(ttl_seconds=2)
    await commit_points(store, range(1, 3))

    await asyncio.sleep(1.2)
    assert await store.load(TENANT, SESSION) is not None
    await asyncio.sleep(1.2)

    assert await store.load(TENANT, SESSION) is not None
    assert [turn for turn, _ in await store.trajectory(TENANT, SESSION)] == [1, 2]


async def test_concurrent_commits_both_land(store: StateStore) -> None:
    both_loaded = asyncio.Barrier(2)
    conflicts = 0

    async def take_turn() -> None:
        nonlocal conflicts
        for attempt in range(5):
            stored = await store.load(TENANT, SESSION)
            version = stored.version if stored else 0
            turn = (json.loads(stored.record)["turn"] if stored else 0) + 1
            if attempt == 0:
                await both_loaded.wait()
            try:
                await store.commit(TENANT, SESSION, expected_version=version,
                                   record=json.dumps({"turn": turn}).encode(),
                                   point=f"point {turn}".encode(), turn=turn)
                return
            except StateConflict:
                conflicts += 1
        raise AssertionError("commit still conflicted after 5 attempts")

    await asyncio.gather(take_turn(), take_turn())

    stored = await store.load(TENANT, SESSION)
    assert stored is not None
    assert json.loads(stored.record) == {"turn": 2}
    assert stored.version == 2
    assert [turn for turn, _ in await store.trajectory(TENANT, SESSION)] == [1, 2]
    assert conflicts == 1


async def test_idempotent_reply_is_stored_with_the_commit(store: StateStore) -> None:
    await store.commit(TENANT, SESSION, expected_version=0, record=b"r1", point=b"p1", turn=1,
                       idempotent=("ab12", b"reply one"))

    stored = await store.load(TENANT, SESSION, idempotency_id="ab12")
    assert stored is not None and stored.idempotent_reply == b"reply one"
    assert (await store.load(TENANT, SESSION, idempotency_id="cd34")).idempotent_reply is None
    assert (await store.load(TENANT, SESSION)).idempotent_reply is None


async def test_conflicting_commit_stores_no_reply(store: StateStore) -> None:
    await commit_points(store, range(1, 2))
    with pytest.raises(StateConflict):
        await store.commit(TENANT, SESSION, expected_version=0, record=b"x", turn=1, idempotent=("ab", b"lost"))

    assert (await store.load(TENANT, SESSION, idempotency_id="ab")).idempotent_reply is None


async def test_oldest_replies_are_dropped(store: StateStore) -> None:
    from app.store.base import IDEMPOTENT_REPLIES_MAX

    version = 0
    for turn in range(1, IDEMPOTENT_REPLIES_MAX + 3):
        version = await store.commit(TENANT, SESSION, expected_version=version, record=b"r", turn=turn,
                                     idempotent=(f"{turn:x}", f"reply {turn}".encode()))

    remaining = [turn for turn in range(1, IDEMPOTENT_REPLIES_MAX + 3)
            if (await store.load(TENANT, SESSION, idempotency_id=f"{turn:x}")).idempotent_reply is not None]
    assert remaining == list(range(3, IDEMPOTENT_REPLIES_MAX + 3))


async def test_remember_reply_for_a_committed_turn(store: StateStore) -> None:
    assert not await store.remember_reply(TENANT, SESSION, "ab", turn=1, reply=b"none")
    await store.commit(TENANT, SESSION, expected_version=0, record=b"r1", turn=1)

    assert await store.remember_reply(TENANT, SESSION, "ab", turn=1, reply=b"reply one")
    stored = await store.load(TENANT, SESSION, idempotency_id="ab")
    assert stored.idempotent_reply == b"reply one"
    assert stored.version == 1


@pytest.mark.parametrize("operation", ["reset", "delete"])
async def test_reset_and_delete_forget_replies(store: StateStore, operation: str) -> None:
    await store.commit(TENANT, SESSION, expected_version=0, record=b"r1", turn=1, idempotent=("ab", b"reply"))
    if operation == "reset":
        await store.reset(TENANT, SESSION, b"fresh")
    else:
        await store.delete(TENANT, SESSION)
        await store.commit(TENANT, SESSION, expected_version=0, record=b"r1", turn=1)

    assert (await store.load(TENANT, SESSION, idempotency_id="ab")).idempotent_reply is None


@pytest.mark.parametrize("idempotency_id", ["", "AB", "x" * 65, "12 3", "g"])
async def test_invalid_idempotency_id_raises(store: StateStore, idempotency_id: str) -> None:
    with pytest.raises(ValueError, match="idempotency id"):
        await store.load(TENANT, SESSION, idempotency_id=idempotency_id)
    with pytest.raises(ValueError, match="idempotency id"):
        await store.commit(TENANT, SESSION, expected_version=0, record=b"r", turn=1,
                           idempotent=(idempotency_id, b"reply"))
    assert await store.load(TENANT, SESSION) is None


@pytest.mark.parametrize("session_id", ["a}b", "", "x" * 129, "a b", "a:b", "ä", "a\n"])
async def test_invalid_session_id_raises(store: StateStore, session_id: str) -> None:
    with pytest.raises(ValueError):
        await store.load(TENANT, session_id)
    with pytest.raises(ValueError):
        await store.commit(TENANT, session_id, expected_version=0, record=b"r")
    with pytest.raises(ValueError):
        await store.trajectory(TENANT, session_id)


@pytest.mark.parametrize("tenant", ["a.b", "", "t" * 65, "a{b"])
async def test_invalid_tenant_raises(store: StateStore, tenant: str) -> None:
    with pytest.raises(ValueError):
        await store.reset(tenant, SESSION, b"r")
    with pytest.raises(ValueError):
        await store.delete(tenant, SESSION)


async def test_longest_valid_ids_are_accepted(store: StateStore) -> None:
    tenant, session_id = "t" * 64, "s." * 64

    await store.commit(tenant, session_id, expected_version=0, record=b"r")

    assert await store.load(tenant, session_id) is not None


async def test_ping_succeeds(store: StateStore) -> None:
    await store.ping()


async def test_memory_write_sweeps_expired_sessions() -> None:
    store = MemoryStateStore(ttl_seconds=1)
    await store.commit(TENANT, "expired", expected_version=0, record=b"old")

    await asyncio.sleep(1.1)
    await store.commit(TENANT, SESSION, expected_version=0, record=b"new")

    assert list(store._sessions) == [(TENANT, SESSION)]


# Redis-specific tests.


def test_create_store_picks_backend(redis_url: str) -> None:
    assert isinstance(create_store(None), MemoryStateStore)
    assert isinstance(create_store(""), MemoryStateStore)
    assert isinstance(create_store(redis_url), RedisStateStore)


def test_redis_key_layout() -> None:
    store = RedisStateStore("redis://127.0.0.1:6379/0", prefix="p")

    assert store.state_key("t", "s") == "p:{t:s}:state"
    assert store.trajectory_key("t", "s") == "p:{t:s}:trajectory"
    assert store.replies_key("t", "s") == "p:{t:s}:replies"


async def test_redis_commit_sets_ttl_on_both_keys(
        redis_url: str, redis_prefix: str, redis_client: aioredis.Redis) -> None:
    store = RedisStateStore(redis_url, prefix=redis_prefix, ttl_seconds=60)
    try:
        await commit_points(store, range(1, 2))
        state_ttl = await redis_client.pttl(store.state_key(TENANT, SESSION))
        trajectory_ttl = await redis_client.pttl(store.trajectory_key(TENANT, SESSION))
    finally:
        await store.close()

    assert 0 < state_ttl <= 60_000
    assert 0 < trajectory_ttl <= 60_000


async def test_redis_retried_commit_is_not_a_conflict(
        redis_url: str, redis_prefix: str) -> None:
    """A commit re-sent after its first attempt was applied returns success, not a conflict."""
    store = RedisStateStore(redis_url, prefix=redis_prefix)
    keys = store._keys(TENANT, SESSION)
    args = [0, b"record", 60_000, "commit-id-1", "1", 1, b"point", store.trajectory_max, "", b"", 16]
    try:
        first = await store._commit_script(keys=keys, args=args)
        retried = await store._commit_script(keys=keys, args=args)
        other = await store._commit_script(keys=keys, args=[*args[:3], "commit-id-2", *args[4:]])
        trajectory = await store.trajectory(TENANT, SESSION)
    finally:
        await store.close()

    assert first == [1, 1]
    assert retried == [1, 1]
    assert other == [0, 1]
    assert trajectory == [(1, b"point")]


async def test_redis_unreachable_raises_store_unavailable(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    store = RedisStateStore(f"redis://:secretpw@127.0.0.1:{port}/0")
    caplog.set_level(logging.WARNING, logger="app.store.redis")
    try:
        with pytest.raises(StoreUnavailable) as load_error:
            await store.load(TENANT, SESSION)
        with pytest.raises(StoreUnavailable) as commit_error:
            await store.commit(TENANT, SESSION, expected_version=0, record=b"r")
        with pytest.raises(StoreUnavailable) as ping_error:
            await store.ping()
    finally:
        await store.close()

    assert f"127.0.0.1:{port}" in load_error.value.message
    assert "secretpw" not in load_error.value.message
    assert "secretpw" not in commit_error.value.message
    assert "secretpw" not in ping_error.value.message
    assert "changed nothing" in load_error.value.message
    assert "not confirmed" in commit_error.value.message
    assert load_error.value.code == "store_unavailable"
    assert SESSION in caplog.text
    assert caplog.text.count("failed during") == 1
    assert "secretpw" not in caplog.text


async def test_redis_store_recovers_after_restart(
        redis_server_factory: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.store.redis")
    server = redis_server_factory()
    store = RedisStateStore(server.url, prefix="senab-test-recovery")
    try:
        assert await store.commit(TENANT, SESSION, expected_version=0, record=b"before") == 1

        server.stop()
        with pytest.raises(StoreUnavailable):
            await store.load(TENANT, SESSION)

        server.start()
        assert await store.load(TENANT, SESSION) is None
        assert await store.commit(TENANT, SESSION, expected_version=0, record=b"after") == 1
        await store.ping()
    finally:
        await store.close()

    assert "reachable again" in caplog.text


async def test_redis_store_hung_server_times_out(redis_server_factory: Callable[[], RedisServer]) -> None:
    """A Redis that hangs (SIGSTOP) raises StoreUnavailable within the timeout. After it
    resumes, the next call reads the committed state, not a reply left on the socket."""
    server = redis_server_factory()
    store = RedisStateStore(server.url, prefix="senab-test-hung")
    try:
        assert await store.commit(TENANT, SESSION, expected_version=0, record=b"before") == 1

        server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable):
                await store.commit(TENANT, SESSION, expected_version=1, record=b"lost")
            elapsed = time.monotonic() - started
        finally:
            server.process.send_signal(signal.SIGCONT)

        # The socket timeout (2 s) with one retry, and then some slack for a loaded machine.
        assert elapsed < 15
        loaded = await store.load(TENANT, SESSION)
        assert loaded is not None
        # The timed-out commit may have run once Redis resumed: either record is consistent.
        assert (loaded.record, loaded.version) in {(b"before", 1), (b"lost", 2)}
        assert await store.commit(TENANT, SESSION, expected_version=loaded.version, record=b"after") \
            == loaded.version + 1
    finally:
        await store.close()


async def test_redis_pooled_connection_survives_restart(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    """A connection left in the pool before a restart is replaced without a failed call."""
    server = redis_server_factory()
    store = RedisStateStore(server.url, prefix="senab-test-restart")
    try:
        await store.commit(TENANT, SESSION, expected_version=0, record=b"before")

        server.stop()
        server.start()

        assert await store.load(TENANT, SESSION) is None
    finally:
        await store.close()


async def test_redis_memory_usage_per_session(
        redis_url: str, redis_prefix: str, redis_client: aioredis.Redis) -> None:
    store = RedisStateStore(redis_url, prefix=redis_prefix)
    try:
        version = 0
        for turn in range(1, 101):
            version = await store.commit(TENANT, SESSION, expected_version=version,
                                         record=bytes(150), point=bytes(170), turn=turn)
        state_bytes = await redis_client.memory_usage(store.state_key(TENANT, SESSION), samples=0)
        trajectory_bytes = await redis_client.memory_usage(
            store.trajectory_key(TENANT, SESSION), samples=0)
    finally:
        await store.close()

    print(f"\nRedis MEMORY USAGE for one session with a 150-byte record and 100 points of "
          f"170 bytes: state {state_bytes} B, trajectory {trajectory_bytes} B, "
          f"total {state_bytes + trajectory_bytes} B")
    assert state_bytes + trajectory_bytes < 64 * 1024
