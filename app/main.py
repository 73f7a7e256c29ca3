"""The FastAPI application factory and the service's start-up and shut-down."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.chat import ChatService
from app.config import Settings
from app.deps import Services
from app.engine import Engine, ServedModel, keep_main_thread_serial
from app.errors import error_body, install_error_handlers
from app.metrics import Metrics, endpoint_label
from app.routes import chat, health, sessions
from app.sessions import SessionService
from app.store import StateStore, create_store

logger = logging.getLogger(__name__)

UI_DIRECTORY = Path(__file__).resolve().parent / "static" / "ui"


def load_served_model(settings: Settings) -> ServedModel:
    """Load the base model and the bridge checkpoint named by the settings."""
    from senab.bridge import checkpoint_for_model
    from senab.models import load_model

    keep_main_thread_serial()
    home = Path(settings.home).expanduser() if settings.home else None
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, home=home,
                        quantization=settings.quantization)
    checkpoint, origin = checkpoint_for_model(loaded.name, loaded.model.config, path=settings.bridge or None,
                                              base_digest=loaded.digest)
    if origin == "path":
        logger.info("bridge checkpoint %s loaded from %s", checkpoint.checkpoint_id, settings.bridge)
    elif origin == "shipped":
        logger.info("shipped bridge checkpoint %s loaded for %s", checkpoint.checkpoint_id, loaded.name)
    else:
        logger.info("no trained bridge checkpoint for %s: serving untrained checkpoint %s with its write-out at "
                    "zero, so replies equal the base model's while session states still move",
                    loaded.name, checkpoint.checkpoint_id)
    if checkpoint.base_model and checkpoint.base_model != loaded.name:
        logger.warning("bridge checkpoint %s was made for %s but the base model is %s",
                       checkpoint.checkpoint_id, checkpoint.base_model, loaded.name)
    elif checkpoint.base_digest and loaded.digest and checkpoint.base_digest != loaded.digest:
        logger.warning("bridge checkpoint %s was trained on weights with digest %s but the loaded weights have %s",
                       checkpoint.checkpoint_id, checkpoint.base_digest[:12], loaded.digest[:12])
    return ServedModel(model=loaded.model, tokenizer=loaded.tokenizer, name=loaded.name,
                       context_length=loaded.context_length, checkpoint=checkpoint,
                       device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."),
                       weights=loaded.quantization)


# Probes and scrapers call these every few seconds; their access lines are logged at DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestContextMiddleware:
    """Give every request an id (X-Request-Id), reject bodies over the size limit (413),
    count responses by endpoint and status, and log one access line per request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        limit = self.max_body_bytes
        endpoint = endpoint_label(scope.get("path", ""))

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.metrics.http_requests.labels(endpoint, "413").inc()
            await _send_json(send, 413, error_body(
                f"The request body has {int(length)} bytes, more than the limit of {limit} bytes.",
                "invalid_request_error", None, "payload_too_large"), request_id)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(
                        413, f"The request body is larger than the limit of {limit} bytes.")
            return message

        started = time.monotonic()
        status = 500  # if the app fails before it starts a response

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
                self.metrics.http_requests.labels(endpoint, str(status)).inc()
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        finally:
            self._log_access(scope, request_id, status, started)

    @staticmethod
    def _log_access(scope: Scope, request_id: str, status: int, started: float) -> None:
        path = scope.get("path", "")
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        fields: dict[str, object] = {"request_id": request_id, "method": scope.get("method"), "path": path,
                                     "status": status, "latency_ms": latency_ms}
        turn = scope.get("state", {}).get("turn")
        if turn is not None:
            fields.update(session_id=turn.session_id, prompt_tokens=turn.prompt_tokens,
                          completion_tokens=turn.completion_tokens)
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        if turn is None:
            logger.log(level, "request %s: %s %s -> %d in %.1f ms", request_id, fields["method"], path, status,
                       latency_ms, extra=fields)
        else:
            logger.log(level, "request %s: %s %s -> %d in %.1f ms (session %s, %d prompt and %d completion tokens)",
                       request_id, fields["method"], path, status, latency_ms, turn.session_id, turn.prompt_tokens,
                       turn.completion_tokens, extra=fields)


async def _send_json(send: Send, status: int, body: dict, request_id: str) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", request_id.encode("latin-1"))]})
    await send({"type": "http.response.body", "body": payload})


def create_app(settings: Settings | None = None, *, served: ServedModel | None = None,
               store: StateStore | None = None) -> FastAPI:
    """Build the application; `served` and `store` let tests inject a tiny model or a store."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.monotonic()
        logger.info("starting SENAB server with settings %s", settings.redacted())
        model = served or load_served_model(settings)
        state_store = store or create_store(
            settings.redis_url.get_secret_value() if settings.redis_url else None,
            prefix=settings.redis_prefix, ttl_seconds=settings.session_ttl_s,
            trajectory_max=settings.trajectory_max)
        if state_store.name == "memory":
            logger.info("session state is kept in process memory (REDIS_URL is unset): it is lost on restart "
                        "and not shared between replicas")
        else:
            logger.info("session state is kept in Redis at %s",
                        settings.redacted()["redis_url"] if settings.redis_url else "the injected store")
        engine = Engine(model, max_queue=settings.max_queue, max_batch_size=settings.max_batch_size,
                        metrics=metrics, prefix_cache_bytes=settings.prefix_cache_mb << 20)
        engine.start()
        metrics.watch_engine(running=lambda: engine.running, waiting=lambda: engine.waiting,
                             prefix_cache=engine.prefix_stats)
        session_service = SessionService(state_store, model.checkpoint, metrics=metrics)
        app.state.services = Services(
            settings=settings, engine=engine, store=state_store, sessions=session_service,
            chat=ChatService(engine, session_service, max_tokens_default=settings.max_tokens_default,
                             max_tokens_cap=settings.max_tokens_cap, request_timeout_s=settings.request_timeout_s,
                             default_temperature=settings.default_temperature,
                             default_top_p=settings.default_top_p,
                             max_prompt_tokens=settings.max_prompt_tokens, metrics=metrics),
            metrics=metrics, api_keys=settings.api_key_tenants(),
        )
        if not app.state.services.api_keys:
            logger.info("SENAB_API_KEYS is unset: requests need no API key and share one tenant")
        logger.info("serving %s and %s on %s (%s, %s), bridge checkpoint %s, %d trainable bridge parameters; "
                    "engine and state store ready in %.1f s", model.name, model.senab_name, model.device, model.dtype, model.weights,
                    model.checkpoint.checkpoint_id, model.checkpoint.bridge.num_parameters(),
                    time.monotonic() - started)
        try:
            yield
        finally:
            engine.stop()
            await state_store.close()
            logger.info("SENAB server stopped")

    app = FastAPI(title="SENAB", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible chat with a Neural Cellular Automata bridge and per-session state")
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(health.router)
    app.include_router(sessions.router)

    @app.get("/ui", include_in_schema=False)
    async def ui_redirect() -> RedirectResponse:
        return RedirectResponse("/ui/")

    # The page's files are public; the API calls it makes carry the key the user enters.
    app.mount("/ui/", StaticFiles(directory=UI_DIRECTORY, html=True), name="ui")
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app
