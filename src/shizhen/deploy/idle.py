"""Cost control inside the server: stop this RunPod pod when nobody uses it, or once it has run long enough.

Idle means no model request running and none finished for `idle_seconds`; a streaming answer in progress always
counts as activity. The stop goes through RunPod's API with the pod's own `RUNPOD_POD_ID` and `RUNPOD_API_KEY`
(RunPod sets both in every pod); RunPod then sends SIGTERM, which drains the server gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class PodAutoStop:
    def __init__(self, activity, idle_seconds: float | None, max_uptime_seconds: float | None, check_seconds: float,
                 stop_pod: Callable[[], None]):
        self._activity = activity  # in_flight and last_activity, kept by RequestObserver
        self._idle_seconds = idle_seconds
        self._max_uptime_seconds = max_uptime_seconds
        self._check_seconds = check_seconds
        self._stop_pod = stop_pod
        self._started = time.monotonic()

    @classmethod
    def for_this_pod(cls, activity, settings) -> PodAutoStop | None:
        """None when neither limit is set; a warning when they are set but this is not a RunPod pod."""
        if not (settings.idle_stop_seconds or settings.max_uptime_hours):
            return None
        pod_id = os.environ.get("RUNPOD_POD_ID")
        if not pod_id:
            log.warning("idle/uptime auto-stop is configured but RUNPOD_POD_ID is not set: not on a pod, disabled")
            return None

        def stop_pod() -> None:
            from .runpod_client import RunPodClient

            RunPodClient().stop_pod(pod_id)

        max_uptime = settings.max_uptime_hours * 3600 if settings.max_uptime_hours else None
        return cls(activity, settings.idle_stop_seconds, max_uptime, settings.idle_check_seconds, stop_pod)

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
        idle_for = now - self._activity.last_activity
        if self._idle_seconds and self._activity.in_flight == 0 and idle_for >= self._idle_seconds:
            return f"no request for {idle_for:.0f} s (SHIZHEN_IDLE_STOP_SECONDS)"
        return None
