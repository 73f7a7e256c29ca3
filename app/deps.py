"""Typed FastAPI dependencies: the services a route needs and the caller's tenant."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from app.chat import ChatService
from app.config import Settings
from app.engine import Engine
from app.errors import Unauthorized
from app.metrics import Metrics
from app.sessions import SessionService
from app.store import StateStore

logger = logging.getLogger(__name__)

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
    # (tenant, SHA-256 of the key) per API key; empty serves without authentication.
    api_keys: list[tuple[str, bytes]] = field(default_factory=list)


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_tenant(request: Request) -> str:
    """Return the tenant of the request's API key, or the default tenant without keys.

    Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every
    configured key, so the time taken does not depend on how much of a key matched.
    """
    api_keys = get_services(request).api_keys
    if not api_keys:
        return DEFAULT_TENANT
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        logger.info("request %s: rejected without a bearer API key", get_request_id(request))
        raise Unauthorized("This server needs an API key: send the header 'Authorization: Bearer <key>'.",
                           headers={"WWW-Authenticate": "Bearer"})
    digest = hashlib.sha256(token.strip().encode()).digest()
    tenant = None
    for name, expected in api_keys:
        if hmac.compare_digest(digest, expected):
            tenant = name
    if tenant is None:
        logger.info("request %s: rejected with an unknown API key", get_request_id(request))
        raise Unauthorized("The API key is not valid for this server.", headers={"WWW-Authenticate": "Bearer"})
    return tenant


def get_request_id(request: Request) -> str:
    return request.state.request_id


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
