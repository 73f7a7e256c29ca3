"""Session state, trajectory, reset and delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.deps import RequestIdDep, ServicesDep, TenantDep
from app.errors import InvalidRequest
from app.events import turn_events
from app.protocol import (DeleteResponse, ResetResponse, SessionState, Trajectory, TrajectoryPoint,
                          check_session_id)

router = APIRouter(prefix="/sessions")


@router.get("/{session_id}/state", response_model=SessionState)
async def get_state(session_id: str, services: ServicesDep, tenant: TenantDep) -> SessionState:
    """Return the session's current state vector and affect."""
    check_session_id(session_id)
    loaded = await services.sessions.require(tenant, session_id)
    record = loaded.record
    affect = services.sessions.affect(record.state)
    return SessionState(session_id=session_id, turn=record.turn, valence=affect.valence, arousal=affect.arousal,
                        distance=affect.distance, state=record.state.tolist(), checkpoint=record.checkpoint_id,
                        updated_at=record.updated_at)


@router.get("/{session_id}/trajectory", response_model=Trajectory)
async def get_trajectory(
    session_id: str, services: ServicesDep, tenant: TenantDep,
    since: Annotated[int | None, Query(ge=0, description="Only points with a turn greater than this.")] = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000, description="At most this many points.")] = None,
) -> Trajectory:
    """Return the state after each committed turn, oldest first."""
    check_session_id(session_id)
    points = await services.sessions.trajectory(tenant, session_id, since=since, limit=limit)
    return Trajectory(session_id=session_id, points=[
        TrajectoryPoint(turn=p.turn, time=p.time, valence=p.affect.valence, arousal=p.affect.arousal,
                        distance=p.affect.distance, state=p.state.tolist())
        for p in points
    ])


@router.post("/{session_id}/reset", response_model=ResetResponse)
async def reset_session(session_id: str, services: ServicesDep, tenant: TenantDep) -> ResetResponse:
    """Put the session back at the set-point and clear its trajectory."""
    check_session_id(session_id)
    async with services.sessions.lock(tenant, session_id):
        record = await services.sessions.reset(tenant, session_id)
    return ResetResponse(session_id=session_id, turn=record.turn)


@router.delete("/{session_id}", response_model=DeleteResponse)
async def delete_session(session_id: str, services: ServicesDep, tenant: TenantDep) -> DeleteResponse:
    """Delete the session's state and trajectory."""
    check_session_id(session_id)
    async with services.sessions.lock(tenant, session_id):
        await services.sessions.delete(tenant, session_id)
    return DeleteResponse(id=session_id, deleted=True)


@router.get("/{session_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "One `turn` event per commit."}})
async def session_events(
    session_id: str, request: Request, services: ServicesDep, tenant: TenantDep, request_id: RequestIdDep,
    since: Annotated[int | None, Query(ge=0, description="Send the turns after this one (default: only new "
                                                         "turns).")] = None,
    last_event_id: Annotated[str | None, Header(description="Sent by EventSource on reconnection.")] = None,
) -> StreamingResponse:
    """Stream the session's committed turns as server-sent events, live."""
    check_session_id(session_id)
    loaded = await services.sessions.require(tenant, session_id)
    after = loaded.record.turn if since is None else since
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise InvalidRequest(f"Last-Event-ID must be a turn number, got {last_event_id[:40]!r}.",
                                 param="Last-Event-ID")
        after = int(last_event_id)
    events = turn_events(services.sessions, tenant, session_id, after=after, request_id=request_id,
                         disconnected=request.is_disconnected)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
