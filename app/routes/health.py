"""Liveness, readiness and the model list."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from app.deps import ServicesDep, get_tenant
from app.errors import ServiceError, error_body
from app.metrics import CONTENT_TYPE
from app.protocol import ModelCard, ModelList

router = APIRouter()
_STARTED = int(time.time())


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Report that the process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Report whether the model is loaded and the state store replies to a ping."""
    if not services.engine.ready:
        return JSONResponse(error_body("The model is not loaded.", "server_error", None, "model_unavailable"),
                            status_code=503)
    try:
        await services.store.ping()
    except ServiceError as exc:
        return JSONResponse(error_body(exc.message, exc.error_type, None, exc.code), status_code=503)
    return JSONResponse({"status": "ready", "model": services.engine.served.name, "store": services.store.name})


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Serve the Prometheus metrics (text exposition format)."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(get_tenant)])
async def list_models(services: ServicesDep) -> ModelList:
    """List the base model and the same model with the SENAB bridge."""
    return ModelList(data=[ModelCard(id=name, created=_STARTED) for name in services.chat.model_names])
