"""POST /v1/chat/completions, streaming (server-sent events) and not."""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, AsyncIterator, Callable

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.chat import Turn
from app.deps import RequestIdDep, ServicesDep, TenantDep
from app.errors import ServiceError, error_body, log_service_error, service_error_body
from app.protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
                          DeltaMessage, ErrorResponse, ResponseMessage, Usage, completion_id)

logger = logging.getLogger(__name__)

router = APIRouter()

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 422, 429, 503, 504)}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def create_chat_completion(
    request: ChatCompletionRequest, services: ServicesDep, tenant: TenantDep, request_id: RequestIdDep,
    http_request: Request, x_session_id: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(description="Retries with the same key return the first "
                                                             "reply and do not advance the state again.")] = None,
):
    """Continue a session's conversation with one assistant reply."""
    turn = await services.chat.start_turn(request, tenant=tenant, header_session_id=x_session_id,
                                          request_id=request_id, idempotency_key=idempotency_key)
    http_request.state.turn = turn  # for the access log line
    headers = {"X-Session-Id": turn.session_id}
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return TurnStreamingResponse(turn, _stream(turn, include_usage), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})

    try:
        async for _ in turn.stream():
            pass
    finally:
        turn.close()
    completion = ChatCompletion(
        model=turn.model,
        choices=[Choice(message=ResponseMessage(content=turn.text), finish_reason=turn.finish_reason)],
        usage=_usage(turn),
        senab=turn.senab_info(),
    )
    return JSONResponse(completion.model_dump(), headers=headers)


class TurnStreamingResponse(StreamingResponse):
    """A stream that always closes its turn, even if the client left before the first chunk.

    The event generator's own `finally` does not run when it is never started, and the turn
    holds the session's lock until it is closed.
    """

    def __init__(self, turn: Turn, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.close()


def _usage(turn: Turn) -> Usage:
    return Usage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                 total_tokens=turn.prompt_tokens + turn.completion_tokens)


_PLACEHOLDER = "\x00"  # json.dumps writes it as \u0000, which no other part of a chunk contains


def _event(payload: ChatCompletionChunk | dict) -> str:
    if isinstance(payload, dict):
        data = payload
    else:
        data = payload.model_dump()
        for optional in ("usage", "senab"):
            if data[optional] is None:
                del data[optional]
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def content_event_builder(template: ChatCompletionChunk) -> Callable[[str], str]:
    """Return a function that makes the event of `template` with another content text.

    `template` carries `_PLACEHOLDER` as its content. Content chunks differ only in their
    text, so their JSON is built once and each text spliced in. Validating and dumping a
    model per token held the GIL long enough to slow the decode thread by about 15%.
    """
    before, after = _event(template).split(json.dumps(_PLACEHOLDER))
    return lambda text: before + json.dumps(text, ensure_ascii=False) + after


async def _stream(turn: Turn, include_usage: bool) -> AsyncIterator[str]:
    # The 200 and its headers are already sent once this runs, so a failure from here on
    # becomes an error event followed by [DONE].
    chunk_id, created = completion_id(), int(time.time())

    def chunk(delta: DeltaMessage, finish_reason=None, **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=turn.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)], **extra)

    content_event = content_event_builder(chunk(DeltaMessage(content=_PLACEHOLDER)))
    try:
        yield _event(chunk(DeltaMessage(role="assistant", content="")))
        async for text in turn.stream():
            yield content_event(text)
        yield _event(chunk(DeltaMessage(), finish_reason=turn.finish_reason, senab=turn.senab_info()))
        if include_usage:
            yield _event(ChatCompletionChunk(id=chunk_id, created=created, model=turn.model, choices=[],
                                             usage=_usage(turn)))
    except ServiceError as exc:
        log_service_error(turn.request_id, exc, turn.session_id)
        yield _event(service_error_body(exc))
    except Exception:
        logger.exception("request %s: stream on session %s failed", turn.request_id, turn.session_id)
        yield _event(error_body("Internal server error; see the server log.", "server_error", None,
                                "internal_error"))
    finally:
        turn.close()
    yield "data: [DONE]\n\n"
