"""`/live` (the process is up), `/ping` (RunPod's worker contract) and `/health` (the model's state, for load
balancers and the deploy kit). Everything here is what the engine client last heard from the engine process."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..engine.client import EngineState
from .deps import Context

router = APIRouter()


@router.get("/live")
async def live() -> dict[str, str]:
    """Always 200 while the process runs."""
    return {"status": "alive"}


@router.get("/ping")
async def ping(context: Context) -> Response:
    """RunPod's serverless worker contract: 204 while the model loads, 200 when it serves, 503 when failed or
    draining (the load balancer routes only to 200s, and counts a worker's cold start from 204 to 200)."""
    state = context.engine.state
    if state is EngineState.LOADING:
        return Response(status_code=204)
    if state is EngineState.READY and not context.chat.draining:
        return Response(status_code=200)
    return Response(status_code=503)


@router.get("/health")
async def health(context: Context) -> JSONResponse:
    """200 when the model is ready to serve; 503 while loading (a restarting engine included) or after a failure."""
    engine = context.engine
    body: dict = {"status": engine.state.value, "model": context.settings.model_name}
    if context.random_test_model:
        body["random_test_model"] = True
    if engine.restarts:
        body["engine_restarts"] = engine.restarts
    if engine.state is EngineState.LOADING:
        body |= engine.phase.health() | {"elapsed_s": round(time.monotonic() - context.started, 1)}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "10"})
    if engine.state is EngineState.FAILED:
        return JSONResponse(body | {"error": engine.error}, status_code=503)
    if context.chat.draining:
        return JSONResponse(body | {"status": "draining"}, status_code=503)
    info, stats = engine.info, engine.stats
    body |= {
        "device": info.device,
        "dtype": info.dtype,
        "gpu_memory": stats.gpu_memory,
        "load_seconds": info.load_seconds,
        "requests": {"running": stats.running, "waiting": stats.waiting},
        "kv_cache": {"sequences": info.slots, "tokens_per_sequence": info.max_len},
        "limits": context.limits,
    }
    return JSONResponse(body)
