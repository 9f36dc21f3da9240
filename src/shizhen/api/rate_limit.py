"""Per-client rate limits with the `limits` library: in memory, or in Redis so that replicas share one budget.

The client is its API key (hashed, so raw keys never reach the storage) or, with keys off, its address. Every
answer carries OpenAI's `x-ratelimit-*` headers; over the limit, 429 with `Retry-After`.
"""

from __future__ import annotations

import hashlib
import math
import time

from fastapi import Request
from limits import parse_many
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from ..errors import RateLimited
from ..observability.requests import current_request


class RateLimiter:
    def __init__(self, rule: str, storage_url: str):
        self._items = parse_many(rule)
        url = storage_url if storage_url.startswith("async+") else f"async+{storage_url}"
        # Redis through redis-py (limits' own default client, coredis, would be one more dependency)
        options = {"implementation": "redispy"} if url.startswith("async+redis") else {}
        self._storage = storage_from_string(url, **options)
        self._strategy = MovingWindowRateLimiter(self._storage)

    async def check(self, identity: str) -> None:
        headers: dict[str, str] = {}
        for item in self._items:
            allowed = await self._strategy.hit(item, "shizhen", identity)
            stats = await self._strategy.get_window_stats(item, "shizhen", identity)
            wait = max(math.ceil(stats.reset_time - time.time()), 1)
            headers = {"x-ratelimit-limit-requests": str(item.amount),
                       "x-ratelimit-remaining-requests": str(stats.remaining),
                       "x-ratelimit-reset-requests": f"{wait}s"}
            record = current_request.get()
            if record is not None:
                record.rate_limit_headers = headers
            if not allowed:
                raise RateLimited(f"rate limit of {item.amount} requests per {item.get_expiry()} s reached; retry in "
                                  f"{wait} s", code="rate_limit_exceeded", retry_after=wait)


async def enforce_rate_limit(request: Request) -> None:
    context = request.app.state.context
    limiter: RateLimiter | None = context.rate_limiter
    if limiter is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if context.settings.api_keys and key:
        identity = "key:" + hashlib.sha256(key.strip().encode()).hexdigest()[:32]
    else:
        identity = "addr:" + (request.client.host if request.client else "unknown")
    await limiter.check(identity)
