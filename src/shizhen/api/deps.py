"""Dependencies shared by the routes: the server context, and the parts of it most routes need."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..engine.client import EngineClient
from ..serving import ChatService
from .context import ServerContext


def server_context(request: Request) -> ServerContext:
    return request.app.state.context


def _chat(request: Request) -> ChatService:
    return server_context(request).chat


def _settings(request: Request) -> Settings:
    return server_context(request).settings


def _engine(request: Request) -> EngineClient:
    return server_context(request).engine


Context = Annotated[ServerContext, Depends(server_context)]
Chat = Annotated[ChatService, Depends(_chat)]
AppSettings = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[EngineClient, Depends(_engine)]
