"""Dependencies shared by the routes: the chat service and settings, as built in the app's lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..engine.engine import Engine
from ..serving import ChatService


def _chat(request: Request) -> ChatService:
    return request.app.state.chat


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _engine(request: Request) -> Engine:
    return request.app.state.engine


Chat = Annotated[ChatService, Depends(_chat)]
AppSettings = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
