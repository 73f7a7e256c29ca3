"""Typed FastAPI dependencies: the services a route needs and the caller's tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.chat import ChatService
from app.config import Settings
from app.engine import Engine
from app.metrics import Metrics
from app.sessions import SessionService
from app.store import StateStore

# Sessions of callers without an API key share this tenant.
DEFAULT_TENANT = "default"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: StateStore
    sessions: SessionService
    chat: ChatService
    metrics: Metrics


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_tenant(request: Request) -> str:
    return DEFAULT_TENANT


def get_request_id(request: Request) -> str:
    return request.state.request_id


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
