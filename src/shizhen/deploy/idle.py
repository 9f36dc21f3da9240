"""Cost control inside the server: stop this RunPod pod when nobody uses it, or once it has run long enough.

Idle means the model serves, no model request is running and none finished for `idle_seconds`; a streaming answer
in progress always counts as activity, and so does loading: the idle clock starts when the model is ready (a first
start that downloads 64 GB must not stop the pod halfway). The stop goes through RunPod's API with the pod's own `RUNPOD_POD_ID` and `RUNPOD_API_KEY`
(RunPod sets both in every pod); RunPod then sends SIGTERM, which drains the server gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from functools import partial

log = logging.getLogger(__name__)


class PodAutoStop:
    def __init__(self, activity, serving: Callable[[], bool], idle_seconds: float | None,
                 max_uptime_seconds: float | None, check_seconds: float, stop_pod: Callable[[], None]):
        self._activity = activity  # in_flight and last_activity, kept by RequestObserver
        self._serving = serving  # false while the engine loads or restarts
        self._idle_seconds = idle_seconds
        self._max_uptime_seconds = max_uptime_seconds
        self._check_seconds = check_seconds
        self._stop_pod = stop_pod
        self._started = time.monotonic()
        self._serving_since: float | None = None  # the idle clock starts here

    @classmethod
    def for_this_pod(cls, activity, serving: Callable[[], bool], settings) -> PodAutoStop | None:
        """None when neither limit is set; a warning when they are set but this is not a RunPod pod."""
        if not (settings.idle_stop_seconds or settings.max_uptime_hours):
            return None
        pod_id = os.environ.get("RUNPOD_POD_ID")
        if not pod_id:
            log.warning("idle/uptime auto-stop is configured but RUNPOD_POD_ID is not set: not on a pod, disabled")
            return None

        from .runpod_client import DeployError, RunPodClient  # here, not at the stop: the SDK takes seconds to import

        try:
            client = RunPodClient()
        except DeployError as exc:
            log.warning("idle/uptime auto-stop is configured but disabled: %s", exc)
            return None
        max_uptime = settings.max_uptime_hours * 3600 if settings.max_uptime_hours else None
        return cls(activity, serving, settings.idle_stop_seconds, max_uptime, settings.idle_check_seconds,
                   partial(client.stop_pod, pod_id))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._check_seconds)
            reason = self._reason_to_stop()
            if reason is None:
                continue
            log.warning("stopping this pod: %s", reason)
            try:
                await asyncio.to_thread(self._stop_pod)
                return
            except Exception:
                log.exception("could not stop the pod; trying again at the next check")

    def _reason_to_stop(self) -> str | None:
        now = time.monotonic()
        if self._max_uptime_seconds and now - self._started >= self._max_uptime_seconds:
            return f"it has been up {self._max_uptime_seconds / 3600:g} h (SHIZHEN_MAX_UPTIME_HOURS)"
        if not self._serving():
            self._serving_since = None
            return None
        if self._serving_since is None:
            self._serving_since = now
        idle_for = now - max(self._activity.last_activity, self._serving_since)
        if self._idle_seconds and self._activity.in_flight == 0 and idle_for >= self._idle_seconds:
            return f"no request for {idle_for:.0f} s (SHIZHEN_IDLE_STOP_SECONDS)"
        return None
