"""`GET /metrics` in Prometheus' text format (guarded by the API keys when SHIZHEN_METRICS_REQUIRE_API_KEY)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Counters, histograms and gauges for requests, tokens, latency, images, KV cache and GPU memory."""
    return Response(request.app.state.context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
