"""One chat turn from request to committed state, independent of the wire format.

`ChatService.start_turn` does everything that can fail before a response starts (model,
session id, state load, prompt length, queue admission) and returns a `Turn`. Iterating
`Turn.stream()` yields text deltas; after the last one the turn is committed, and only
when the reply finished with "stop" or "length". A turn that is closed early (client
gone, error) commits nothing.

The store returns a retried turn's reply instead of running it again: when the request repeats
the conversation of the session's last committed turn, or carries an Idempotency-Key
whose reply is stored (IETF draft-ietf-httpapi-idempotency-key-header).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from typing import AsyncIterator

from app.engine import Engine
from app.errors import (ContextLengthExceeded, IdempotencyKeyReused, InvalidRequest, ModelNotFound, QueueFull,
                        RequestTimeout)
from app.metrics import Metrics
from app.protocol import ChatCompletionRequest, SenabInfo, check_session_id
from app.sessions import LoadedSession, SessionService, StoredReply
from senab.generation import GenerationRequest
from senab.prompt import build_prompt, conversation_digest
from senab.state import SessionRecord

logger = logging.getLogger(__name__)


# Printable ASCII without spaces, as the OpenAI and Stripe clients send it (a UUID fits).
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def new_session_id() -> str:
    """Return a new 128-bit random session id (32 hex characters)."""
    return secrets.token_hex(16)


def check_idempotency_key(key: str) -> str:
    if not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidRequest(
            f"Idempotency-Key {key[:80]!r} is invalid: use 1-255 printable ASCII characters without spaces, "
            "for example a UUID.", param="Idempotency-Key")
    return key


def idempotency_id(key: str) -> str:
    """Return the store's id for an Idempotency-Key (the key itself is never stored)."""
    return hashlib.sha256(b"idempotency\0" + key.encode()).hexdigest()[:32]


def session_id_for_key(key: str) -> str:
    """Return the session id of a request that carries an Idempotency-Key but no session id,
    so that its retry reaches the same new session."""
    return hashlib.sha256(b"session\0" + key.encode()).hexdigest()[:32]


class Turn:
    def __init__(self, service: ChatService, *, tenant: str, session: LoadedSession, model: str,
                 use_bridge: bool, digest: bytes, prompt_tokens: int, request_id: str,
                 job=None, replay: StoredReply | None = None, idempotency_id: str | None = None,
                 release=None) -> None:
        self.service = service
        self.tenant = tenant
        self.session = session
        self.model = model
        self.use_bridge = use_bridge
        self.digest = digest
        self.prompt_tokens = prompt_tokens
        self.request_id = request_id
        self.job = job
        self.replay = replay
        self.idempotency_id = idempotency_id
        self._release = release
        self._closed = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.text = ""
        self.record: SessionRecord = session.record
        self.admitted = time.monotonic()
        self.first_token: float | None = None

    @property
    def session_id(self) -> str:
        return self.session.session_id

    def senab_info(self) -> SenabInfo:
        if self.replay is not None:
            turn, affect = self.replay.turn, self.replay.affect
        else:
            turn, affect = self.record.turn, self.service.sessions.affect(self.record.state)
        return SenabInfo(session_id=self.session_id, turn=turn, valence=affect.valence,
                         arousal=affect.arousal, distance=affect.distance)

    async def stream(self) -> AsyncIterator[str]:
        """Yield the reply's text deltas, then commit the turn."""
        try:
            if self.replay is not None:
                self._finish_replay()
                if self.text:
                    yield self.text
                return
            async for output in self.job.stream():
                if output.text:
                    if self.first_token is None:
                        self.first_token = time.monotonic()
                    self.text += output.text
                    yield output.text
                if output.finish_reason is not None:
                    self.finish_reason = output.finish_reason
                    self.completion_tokens = output.completion_tokens
                    self.prompt_tokens = output.prompt_tokens
                    self.service.metrics.observe_completion(
                        model=self.model, finish_reason=output.finish_reason, prompt_tokens=output.prompt_tokens,
                        completion_tokens=output.completion_tokens, admitted=self.admitted,
                        first_token=self.first_token, finished=time.monotonic())
                    if output.finish_reason in ("stop", "length"):
                        await self._commit(output.readout)
                    else:
                        raise RequestTimeout(
                            f"The completion did not finish within {self.service.request_timeout_s:g} s; "
                            "nothing was committed. Lower max_tokens or retry.")
        finally:
            self.close()

    def _finish_replay(self) -> None:
        stored = self.replay
        self.text = stored.reply
        self.finish_reason = stored.finish_reason
        self.prompt_tokens = stored.prompt_tokens
        self.completion_tokens = stored.completion_tokens
        logger.info("request %s: session %s turn %d was already committed; returning its reply",
                    self.request_id, self.session_id, stored.turn)

    async def _commit(self, readout) -> None:
        sessions = self.service.sessions
        if self.use_bridge and readout is not None:
            self.record = await sessions.commit_turn(
                self.tenant, self.session, readout=readout, digest=self.digest, reply=self.text,
                finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens, idempotency_id=self.idempotency_id)
            logger.info("request %s: session %s committed turn %d", self.request_id, self.session_id,
                        self.record.turn)

    def close(self) -> None:
        """Cancel decoding if it is still running and release the session lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.job is not None and self.finish_reason is None:
            self.job.cancel()
            logger.info("request %s: turn on session %s cancelled before it finished; nothing committed",
                        self.request_id, self.session_id)
        if self._release is not None:
            release, self._release = self._release, None
            release()


class ChatService:
    def __init__(self, engine: Engine, sessions: SessionService, *, max_tokens_default: int,
                 max_tokens_cap: int, request_timeout_s: float, default_temperature: float = 1.0,
                 default_top_p: float = 1.0, max_prompt_tokens: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_prompt_tokens = max_prompt_tokens
        self.metrics = metrics or Metrics()
        self.sessions = sessions
        self.max_tokens_default = max_tokens_default
        self.max_tokens_cap = max_tokens_cap
        self.request_timeout_s = request_timeout_s
        self.default_temperature = default_temperature
        self.default_top_p = default_top_p
        # Requests waiting for one session's lock are not in the engine queue, so they get
        # their own limit (the engine queue's size).
        self.max_waiting_per_session = engine.max_queue
        self._waiting: dict[tuple[str, str], int] = {}

    @property
    def model_names(self) -> list[str]:
        served = self.engine.served
        return [served.name, served.senab_name]

    def resolve_model(self, name: str) -> bool:
        """Return whether `name` is the bridged model; raise ModelNotFound for an unknown one."""
        served = self.engine.served
        if name == served.senab_name:
            return True
        if name == served.name:
            return False
        raise ModelNotFound(
            f"The model '{name}' does not exist; this server serves {served.name!r} and {served.senab_name!r}.",
            param="model",
        )

    async def start_turn(self, request: ChatCompletionRequest, *, tenant: str, header_session_id: str | None,
                         request_id: str, idempotency_key: str | None = None) -> Turn:
        request.check_supported()
        use_bridge = self.resolve_model(request.model)
        given_id = header_session_id is not None or request.session_id is not None
        # A base-model turn changes no state, so its key needs no record.
        key = check_idempotency_key(idempotency_key) if idempotency_key is not None and use_bridge else None
        session_id = self._session_id(header_session_id, request.session_id)
        if key is not None and not given_id:
            session_id = session_id_for_key(key)
        messages = [(m.role, m.text()) for m in request.messages]
        digest = conversation_digest(request.model, messages)

        # Tokenizing a long conversation takes up to a second, so it runs off the event loop.
        prompt = await asyncio.to_thread(build_prompt, self.engine.served.tokenizer, messages)
        max_tokens = self._max_tokens(request, len(prompt.ids))
        params = request.sampling_params(max_tokens, default_temperature=self.default_temperature,
                                         default_top_p=self.default_top_p)

        waiting_key = (tenant, session_id)
        if self._waiting.get(waiting_key, 0) >= self.max_waiting_per_session:
            raise QueueFull(
                f"{self.max_waiting_per_session} requests are already waiting for session '{session_id}'; "
                "retry after 1 s.", headers={"Retry-After": "1"})
        lock = self.sessions.lock(tenant, session_id)
        self._waiting[waiting_key] = self._waiting.get(waiting_key, 0) + 1
        try:
            await lock.acquire()
        finally:
            self._waiting[waiting_key] -= 1
            if not self._waiting[waiting_key]:
                del self._waiting[waiting_key]

        try:
            stored_id = idempotency_id(key) if key is not None else None
            if use_bridge or given_id:
                session = await self.sessions.load_or_start(tenant, session_id, idempotency_id=stored_id)
            else:
                # A base-model request never writes state, so a new id needs no store round trip.
                session = self.sessions.start(session_id)
            common = dict(tenant=tenant, session=session, model=request.model, use_bridge=use_bridge,
                          digest=digest, request_id=request_id, release=lock.release)
            if session.idempotent is not None:
                if session.idempotent.digest != digest.hex():
                    raise IdempotencyKeyReused(
                        f"This Idempotency-Key was first used on turn {session.idempotent.turn} of session "
                        f"'{session_id}' with a different conversation or model; send a new key for a new turn.",
                        param="Idempotency-Key")
                return Turn(self, prompt_tokens=session.idempotent.prompt_tokens, replay=session.idempotent,
                            **common)
            record = session.record
            if use_bridge and record.turn > 0 and record.last_digest == digest:
                replay = StoredReply.from_record(record, self.sessions.affect(record.state))
                if stored_id is not None:
                    await self.sessions.remember_reply(tenant, session_id, stored_id, replay)
                return Turn(self, prompt_tokens=record.last_prompt_tokens, replay=replay, **common)

            job = self.engine.submit(
                # Cached prompt prefixes stay within the tenant (see senab.prefix).
                GenerationRequest(prompt.ids, params, session=session.record.state if use_bridge else None,
                                  turn_start=prompt.turn_start, cache_salt=tenant),
                request_id=request_id, timeout_s=self.request_timeout_s,
            )
            return Turn(self, prompt_tokens=len(prompt.ids), job=job, idempotency_id=stored_id, **common)
        except BaseException:
            lock.release()
            raise

    def _session_id(self, header: str | None, body: str | None) -> str:
        if header is not None and body is not None and header != body:
            raise InvalidRequest(
                f"The X-Session-Id header ({header!r}) and the session_id field ({body!r}) differ; send one.",
                param="session_id",
            )
        given = header if header is not None else body
        if given is None:
            return new_session_id()
        return check_session_id(given, param="session_id" if body is not None else "X-Session-Id")

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        context = self.engine.served.context_length
        requested = request.requested_max_tokens()
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if requested is not None and requested > self.max_tokens_cap:
            raise InvalidRequest(
                f"{param}={requested} is above this server's limit of {self.max_tokens_cap}.", param=param)
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise ContextLengthExceeded(
                f"The prompt has {prompt_tokens} tokens, more than this server's limit of {self.max_prompt_tokens} "
                "prompt tokens (SENAB_MAX_PROMPT_TOKENS); shorten the conversation.", param="messages")
        if prompt_tokens >= context:
            raise ContextLengthExceeded(
                f"The prompt has {prompt_tokens} tokens but the model's context is {context} tokens; "
                "shorten the conversation.", param="messages")
        if requested is not None and prompt_tokens + requested > context:
            raise ContextLengthExceeded(
                f"The prompt has {prompt_tokens} tokens and {param} is {requested}, together more than the "
                f"model's context of {context} tokens; lower {param} or shorten the conversation.", param=param)
        return requested if requested is not None else min(self.max_tokens_default, context - prompt_tokens)
