"""Graceful shutdown for SIGTERM (what RunPod sends when a pod stops).

The first signal starts draining: new model requests get 503, `/health` says "draining", running generations go
on for up to the grace period; then uvicorn's own shutdown closes the connections and the process exits 0. A
second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_seconds: float):
        super().__init__(config)
        self._app = app
        self._grace_seconds = grace_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or not hasattr(self._app.state, "chat"):
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._app.state.chat.draining = True
        log.info("signal %s: draining (up to %.0f s for running requests), then exiting", sig, self._grace_seconds)
        threading.Thread(target=self._exit_when_drained, name="shizhen-drain", daemon=True).start()

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self._grace_seconds
        state = self._app.state
        while time.monotonic() < deadline and state.engine.running + state.engine.waiting + state.in_flight > 0:
            time.sleep(0.05)
        self.should_exit = True
