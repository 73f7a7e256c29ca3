"""Server-sent events of a session's committed turns, for dashboards.

The stream polls the session's trajectory in the store (the Redis Stream on a Redis store),
so it delivers turns committed by any replica. Each committed turn is one `turn` event whose
id is the turn number; a client that reconnects with `Last-Event-ID` (EventSource does this
by itself) gets the turns after that one. When the trajectory's newest turn drops below the
last one sent, the session was reset or deleted: a `reset` event follows and counting starts
again from turn 0. Watching never restarts the session's idle TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

from app.errors import ServiceError, log_service_error, service_error_body
from app.sessions import SessionService

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
# Sent to EventSource clients: wait this long before reconnecting, ms.
RETRY_MS = 2000


def _event(kind: str, data: dict, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def turn_events(sessions: SessionService, tenant: str, session_id: str, *, after: int, request_id: str,
                      disconnected: Callable[[], Awaitable[bool]], poll_s: float = POLL_SECONDS,
                      keepalive_s: float = KEEPALIVE_SECONDS) -> AsyncIterator[str]:
    """Yield SSE text for every turn committed after turn `after`, until the client leaves.

    NOTE: a reset followed, within one poll interval, by more commits than the last sent
    turn is not detected. The stream then continues from the new turns without a `reset` event.
    """
    last = after
    quiet = 0.0
    yield f"retry: {RETRY_MS}\n\n"
    try:
        while not await disconnected():
            latest = await sessions.store.last_turn(tenant, session_id)
            if latest < last:
                last = 0
                yield _event("reset", {"session_id": session_id})
            if latest > last:
                for point in await sessions.points(tenant, session_id, since=last):
                    yield _event("turn", {"session_id": session_id, "turn": point.turn, "time": point.time,
                                          "valence": point.affect.valence, "arousal": point.affect.arousal,
                                          "distance": point.affect.distance, "state": point.state.tolist()},
                                 event_id=point.turn)
                    last = point.turn
                quiet = 0.0
            elif quiet >= keepalive_s:
                yield ": keep-alive\n\n"
                quiet = 0.0
            await asyncio.sleep(poll_s)
            quiet += poll_s
    except ServiceError as exc:
        # The client reconnects after RETRY_MS with the last id it saw.
        log_service_error(request_id, exc, session_id)
        yield _event("error", service_error_body(exc))
