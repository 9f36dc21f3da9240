"""What the routes, the middleware and the lifecycle share, in one typed object at `app.state.context`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import Settings
from ..engine.client import EngineClient
from ..observability.metrics import ServerMetrics
from ..serving import ChatService
from .rate_limit import RateLimiter


@dataclass
class Activity:
    """Model requests being answered, and when one last started or ended: RequestObserver keeps it; draining and
    the idle auto-stop read it."""

    in_flight: int = 0
    last_activity: float = field(default_factory=time.monotonic)


@dataclass
class ServerContext:
    settings: Settings
    engine: EngineClient
    chat: ChatService
    metrics: ServerMetrics
    rate_limiter: RateLimiter | None
    random_test_model: bool  # checked once: it cannot change while serving
    limits: dict[str, int]  # what /health and /v1/models tell clients to adapt to
    activity: Activity = field(default_factory=Activity)
    started: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)
