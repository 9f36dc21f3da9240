"""Per-request bookkeeping: the request id, the one log line, and HTTP-level metrics, as pure ASGI middleware.

The chat service fills the request's `RequestRecord` (found through a context variable, so it needs no FastAPI) with
model, token counts and timings; the log line never carries message contents, images or keys.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServerMetrics


class ActivityRecord(Protocol):
    in_flight: int
    last_activity: float

log = logging.getLogger("shizhen.access")
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    client: str | None
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    rate_limit_headers: dict[str, str] = field(default_factory=dict)


current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("current_request",
                                                                                       default=None)


class RequestObserver:
    """Assigns or accepts `X-Request-ID`, echoes it, counts responses by status, and logs one line at the end."""

    QUIET_PATHS = frozenset({"/health", "/live", "/ping", "/metrics"})  # probes: counted, not logged

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, activity: ActivityRecord):
        self.app = app
        self.metrics = metrics
        self.activity = activity  # model requests in flight: draining and the idle auto-stop read it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        record = RequestRecord(
            request_id=offered if _CLIENT_REQUEST_ID.match(offered) else uuid.uuid4().hex,
            method=scope["method"],
            path=scope["path"],
            client=scope["client"][0] if scope.get("client") else None,
        )
        token = current_request.set(record)
        counted = record.path.startswith("/v1/")
        activity = self.activity
        if counted:
            activity.in_flight += 1
            activity.last_activity = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", record.request_id.encode()))
                headers.extend((k.encode(), v.encode()) for k, v in record.rate_limit_headers.items())
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if counted:
                activity.in_flight -= 1
                activity.last_activity = time.monotonic()
            current_request.reset(token)
            record.total_ms = round((time.perf_counter() - record.started) * 1e3, 1)
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.http_requests.labels(record.method, path, str(record.status or 499)).inc()
            if record.path not in self.QUIET_PATHS:
                fields = {k: v for k, v in asdict(record).items() if v is not None and k not in
                          ("started", "rate_limit_headers")}
                log.info("%s %s %s", record.method, record.path, record.status or "disconnected", extra=fields)
