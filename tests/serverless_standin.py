"""A local stand-in for RunPod's load balancer in front of one load-balancing endpoint, as runpod/docs
(serverless/load-balancing/overview.mdx) describes it: requests carry the RunPod API key as bearer token and go
straight to a worker's own HTTP server; a worker gets traffic only while its health check (`/ping` on
`PORT_HEALTH`) answers 200 (204: initializing; anything else: unhealthy); workers start on demand, one per
`requests_per_worker` concurrent requests up to `workers_max` (the REQUEST_COUNT scaler), a request waits for a
worker up to `no_worker_timeout` (2 min there), and a worker idle for `idle_timeout` is stopped with SIGTERM.
Workers are real `shizhen serve` processes given PORT and PORT_HEALTH, as RunPod gives them."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from conftest import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"host", "authorization", "content-length", "connection", "transfer-encoding"}


@dataclass
class Worker:
    process: subprocess.Popen
    url: str
    health_url: str
    state: str = "starting"  # starting | initializing (204) | healthy (200) | unhealthy
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class StandInLoadBalancer:
    def __init__(self, model: str, api_key: str, workers_max: int, requests_per_worker: int, idle_timeout: float,
                 no_worker_timeout: float = 120):
        self._model, self._api_key = model, api_key
        self._workers_max, self._requests_per_worker = workers_max, requests_per_worker
        self._idle_timeout, self._no_worker_timeout = idle_timeout, no_worker_timeout
        self.workers: list[Worker] = []
        self.started = 0  # workers started so far
        self.exit_codes: list[int] = []  # of the workers stopped for idleness
        self._waiting = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        app = Starlette(routes=[Route("/{path:path}", self._route, methods=["GET", "POST", "OPTIONS"])])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=self._server.run, daemon=True).start()
        threading.Thread(target=self._watch_workers, daemon=True).start()
        while not self._server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self._closing.set()
        self._server.should_exit = True
        for worker in self.workers:
            worker.process.kill()
            worker.process.communicate()

    # --- routing ---------------------------------------------------------------------------------------------------
    async def _route(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self._api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        worker = await self._a_worker()
        if worker is None:
            return JSONResponse({"error": "no workers available"}, status_code=503)
        client = httpx.AsyncClient(timeout=330)  # RunPod's processing timeout: 5.5 min
        upstream = await client.send(client.build_request(
            request.method, worker.url + request.url.path, params=request.query_params, content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}), stream=True)

        async def body():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()
                worker.in_flight -= 1
                worker.last_used = time.monotonic()

        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(body(), status_code=upstream.status_code, headers=headers)

    async def _a_worker(self) -> Worker | None:
        """A healthy worker with room, starting workers as the load asks; None after `no_worker_timeout`."""
        self._waiting += 1
        try:
            deadline = time.monotonic() + self._no_worker_timeout
            while time.monotonic() < deadline:
                with self._lock:
                    ready = [w for w in self.workers
                             if w.state == "healthy" and w.in_flight < self._requests_per_worker]
                    if ready:
                        worker = min(ready, key=lambda w: w.in_flight)
                        worker.in_flight += 1
                        return worker
                    load = self._waiting + sum(w.in_flight for w in self.workers)
                    if len(self.workers) < min(math.ceil(load / self._requests_per_worker), self._workers_max):
                        self.workers.append(self._start_worker())
                await asyncio.sleep(0.05)
            return None
        finally:
            self._waiting -= 1

    def _start_worker(self) -> Worker:
        port, health_port = free_port(), free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "shizhen.cli", "serve", "--model", self._model, "--host", "127.0.0.1"],
            env={**os.environ, "PORT": str(port), "PORT_HEALTH": str(health_port), "SHIZHEN_LOG_JSON": "true"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started += 1
        return Worker(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health_port}/ping")

    # --- health checks and scaling to zero ------------------------------------------------------------------------
    def _watch_workers(self) -> None:
        while not self._closing.wait(0.2):
            for worker in list(self.workers):
                try:
                    code = httpx.get(worker.health_url, timeout=2).status_code
                    state = {200: "healthy", 204: "initializing"}.get(code, "unhealthy")
                except httpx.HTTPError:
                    state = "starting" if worker.process.poll() is None else "unhealthy"
                if state == "healthy" and worker.state != "healthy":
                    worker.last_used = time.monotonic()  # idle from when it could first serve
                worker.state = state
                idle = time.monotonic() - worker.last_used
                unused = not worker.in_flight and not self._waiting
                if worker.state == "healthy" and unused and idle > self._idle_timeout:
                    with self._lock:
                        if worker.in_flight:
                            continue
                        self.workers.remove(worker)
                    worker.process.send_signal(signal.SIGTERM)
                    self.exit_codes.append(worker.process.wait(60))
