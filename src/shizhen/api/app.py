"""The app factory. The engine process starts in the lifespan and loads in the background, so `/live` and
`/health` answer from the first second; tests build apps with their own settings."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..config import Settings
from ..deploy.idle import PodAutoStop
from ..engine.client import EngineClient, EngineState
from ..engine.core import EngineConfig
from ..engine.loader import load_model, require_gpu_if_expected
from ..observability.metrics import ServerMetrics
from ..observability.requests import RequestObserver
from ..serving import ChatService
from ..store import is_random_test_model, model_folder, model_store
from . import chat, health, models, page, tokenize, vision
from . import metrics as metrics_routes
from .auth import require_api_key
from .body_limit import BodySizeLimit
from .context import ServerContext
from .errors import install_error_handlers
from .openapi import install_openapi
from .rate_limit import RateLimiter, enforce_rate_limit

log = logging.getLogger(__name__)


def create_app(settings: Settings, model_source: str | None = None) -> FastAPI:
    """`model_source` is the folder or hub id to load (the demo passes its freshly built checkpoint)."""
    source = model_source or settings.model
    metrics = ServerMetrics()
    engine = EngineClient(partial(load_model_from_settings, source, settings), engine_config(settings),
                          max_restarts=settings.engine_max_restarts)
    metrics.watch_engine(engine)
    context = ServerContext(
        settings=settings,
        engine=engine,
        chat=ChatService(settings, engine, metrics),
        metrics=metrics,
        rate_limiter=RateLimiter(settings.rate_limit, settings.rate_limit_storage_url) if settings.rate_limit else None,
        random_test_model=is_random_test_model(source),
        limits={
            "max_images_per_request": settings.max_images_per_request,
            "max_image_bytes": settings.max_image_bytes,
            "image_min_pixels": settings.image_min_pixels,
            "image_max_pixels": settings.image_max_pixels,
            "max_context_length": settings.max_context_length,
            "max_tokens_limit": settings.max_tokens_limit,
            "max_request_bytes": settings.max_request_bytes,
        },
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if context.random_test_model:
            log.warning("serving a RANDOM TEST MODEL from %s: its answers are gibberish", source)
        context.chat.start()
        await engine.start()
        auto_stop = PodAutoStop.for_this_pod(context.activity, lambda: engine.state is EngineState.READY, settings)
        auto_stop_task = asyncio.create_task(auto_stop.run()) if auto_stop else None
        yield
        if auto_stop_task is not None:
            auto_stop_task.cancel()
        await engine.stop()
        await context.chat.aclose()

    app = FastAPI(title="ShizhenGPT API", version="0.1.0", lifespan=lifespan)
    app.state.context = context
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_allowed_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After", "X-Request-ID", "x-ratelimit-limit-requests",
                        "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
    )
    app.add_middleware(RequestObserver, metrics=metrics, activity=context.activity)
    app.include_router(health.router)
    app.include_router(page.router)
    app.mount("/static", page.static_files, name="static")
    metrics_guard = [Depends(require_api_key)] if settings.metrics_require_api_key else []
    app.include_router(metrics_routes.router, dependencies=metrics_guard)
    api = APIRouter(dependencies=[Depends(require_api_key), Depends(enforce_rate_limit)])
    api.include_router(models.router)
    api.include_router(chat.router)
    api.include_router(vision.router)
    api.include_router(tokenize.router)
    app.include_router(api)
    return app


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_len=settings.max_context_length,
        image_min_pixels=settings.image_min_pixels,
        image_max_pixels=settings.image_max_pixels,
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager,
        kv_cache_tokens=settings.kv_cache_tokens,
        prefill_token_budget=settings.prefill_token_budget,
        prefix_caching=settings.enable_prefix_caching,
        image_cache_tokens=settings.image_cache_tokens,
    )


def load_model_from_settings(source: str, settings: Settings, report_phase):
    """A local folder loads as it is; a hub id goes through the model store (download once, verify, repair).
    Without the GPU the model needs, nothing is downloaded or loaded."""
    require_gpu_if_expected(source, settings.require_gpu)
    if model_folder(source) is None:
        source = str(model_store(settings, report_phase).ensure())
    return load_model(
        source,
        dtype=settings.dtype,
        device_map=settings.device_map,
        max_memory=settings.max_memory,
        report_phase=report_phase,
    )
