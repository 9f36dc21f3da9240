"""Graceful shutdown for SIGTERM (what RunPod sends when a pod stops).

The first signal starts draining: new model requests get 503, `/health` says "draining", running generations go
on for up to the grace period. Answers still running then are cut by the service (a stream ends with an error chunk
and `[DONE]`, a plain request gets a 503), so no connection is dropped mid-body; then uvicorn's own shutdown closes
the connections and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

from ..engine.client import EngineState

log = logging.getLogger(__name__)
CUT_FLUSH_SECONDS = 3  # for cut answers to reach their clients before the connections close


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the process's exit policy: drain on SIGTERM (exit 0), and, with
    `exit_on_load_failure`, exit 1 once the engine has failed (to load, or after restarts), so a supervisor can
    act."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_seconds: float, exit_on_load_failure: bool):
        super().__init__(config)
        self._app = app
        self._grace_seconds = grace_seconds
        self._draining = False
        self._exit_on_load_failure = exit_on_load_failure
        self._watching: asyncio.Task | None = None  # held, so the task is not garbage-collected
        self.exit_code = 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self._exit_on_load_failure and not self.should_exit:
            self._watching = asyncio.create_task(self._exit_if_the_engine_fails())

    async def _exit_if_the_engine_fails(self) -> None:
        """A failed load, or an engine that kept dying after restarts."""
        engine = self._app.state.context.engine
        while engine.state is not EngineState.FAILED:
            await asyncio.sleep(0.2)
        log.error("the model could not be loaded, or its engine kept dying (%s); exiting with code 1 "
                  "(SHIZHEN_STAY_UP_ON_LOAD_FAILURE=true keeps serving /health with the reason instead)", engine.error)
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._app.state.context.chat.draining = True
        log.info("signal %s: draining (up to %.0f s for running requests), then exiting", sig, self._grace_seconds)
        threading.Thread(target=self._exit_when_drained, name="shizhen-drain", daemon=True).start()

    def _exit_when_drained(self) -> None:
        context = self._app.state.context

        def busy() -> bool:
            return context.engine.unfinished + context.activity.in_flight > 0

        if not _wait_until(lambda: not busy(), self._grace_seconds):
            log.warning("grace period over: cutting %d requests still being answered", context.activity.in_flight)
            context.chat.cut_running()
            _wait_until(lambda: not busy(), CUT_FLUSH_SECONDS)
        self.should_exit = True


def _wait_until(done, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
