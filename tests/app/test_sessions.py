import asyncio

import numpy as np

from app.sessions import SessionService
from app.store import MemoryStateStore
from senab.bridge import new_checkpoint
from tests.helpers import make_tiny_llama

DIGEST = bytes(range(32))


def service() -> SessionService:
    model, _ = make_tiny_llama(seed=0)
    return SessionService(MemoryStateStore(), new_checkpoint(model.config))


def commit(sessions: SessionService, session, digest: bytes):
    return sessions.commit_turn("default", session, readout=np.ones(32, np.float32), digest=digest, reply="hi",
                                finish_reason="stop", prompt_tokens=5, completion_tokens=1)


def test_concurrent_duplicate_commit_applies_once():
    async def run():
        sessions = service()
        stale = await sessions.load_or_start("default", "s1")
        await commit(sessions, stale, DIGEST)  # another replica committed the same request
        record = await commit(sessions, stale, DIGEST)
        points = await sessions.trajectory("default", "s1", since=None, limit=None)
        return record, points

    record, points = asyncio.run(run())

    assert record.turn == 1
    assert [p.turn for p in points] == [1]


def test_concurrent_different_commits_both_apply():
    async def run():
        sessions = service()
        stale = await sessions.load_or_start("default", "s2")
        await commit(sessions, stale, DIGEST)
        record = await commit(sessions, stale, bytes(32 * [7]))
        points = await sessions.trajectory("default", "s2", since=None, limit=None)
        return record, points

    record, points = asyncio.run(run())

    assert record.turn == 2
    assert [p.turn for p in points] == [1, 2]
