"""`/live` (the process is up) and `/health` (the model's state, for load balancers and the deploy kit)."""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..engine.engine import EngineState
from .deps import AppSettings, EngineDep

router = APIRouter()


@router.get("/live")
async def live() -> dict[str, str]:
    """Always 200 while the process runs."""
    return {"status": "alive"}


@router.get("/ping")
async def ping(request: Request, engine: EngineDep) -> Response:
    """RunPod's serverless worker contract: 204 while the model loads, 200 when it serves, 503 when failed or
    draining (the load balancer routes only to 200s, and counts a worker's cold start from 204 to 200)."""
    if engine.state is EngineState.LOADING:
        return Response(status_code=204)
    if engine.state is EngineState.READY and not request.app.state.chat.draining:
        return Response(status_code=200)
    return Response(status_code=503)


@router.get("/health")
async def health(request: Request, settings: AppSettings, engine: EngineDep) -> JSONResponse:
    """200 when the model is ready to serve; 503 while loading or after a failed load."""
    body: dict = {"status": engine.state.value, "model": settings.model_name}
    if request.app.state.random_test_model:
        body["random_test_model"] = True
    if engine.state is EngineState.LOADING:
        body |= {"phase": engine.phase, "elapsed_s": round(time.monotonic() - request.app.state.started, 1)}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "10"})
    if engine.state is EngineState.FAILED:
        return JSONResponse(body | {"error": engine.error}, status_code=503)
    if request.app.state.chat.draining:
        return JSONResponse(body | {"status": "draining"}, status_code=503)
    loaded = engine.loaded
    body |= {
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "gpu_memory": _gpu_memory(),
        "load_seconds": round(engine.load_seconds, 2),
        "requests": {"running": engine.running, "waiting": engine.waiting},
        "kv_cache": {"sequences": engine.slots, "tokens_per_sequence": engine.config.max_len},
        "limits": request.app.state.limits,
    }
    return JSONResponse(body)


def _gpu_memory() -> dict[str, dict[str, float]]:
    """Per GPU: GiB in use by this process's tensors, and free/total as the driver sees them."""
    gib = 1024**3
    report = {}
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        report[f"cuda:{index}"] = {
            "allocated_gib": round(torch.cuda.memory_allocated(index) / gib, 2),
            "free_gib": round(free / gib, 2),
            "total_gib": round(total / gib, 2),
        }
    return report
