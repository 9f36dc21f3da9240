"""Image intake: an `image_url.url` (data: or http(s)) → a decoded image ready for the processor.

Decoding runs in the intake's own thread pool, so a 12-megapixel photo stalls neither the event loop nor the
generation worker, and cannot starve the pool that builds prompts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..config import Settings
from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from ..observability.metrics import ServerMetrics
from .decode import ImageLimits, decode_image
from .fetch import FetchPolicy, ImageFetcher

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)


class ImageIntake:
    def __init__(self, settings: Settings, metrics: ServerMetrics):
        self._metrics = metrics
        self.limits = ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_decoded_pixels=settings.max_image_decoded_pixels,
            min_pixels=settings.image_min_pixels,
            max_pixels=settings.image_max_pixels,
        )
        self._fetcher = ImageFetcher(FetchPolicy(
            enabled=settings.image_fetch_enabled,
            allowed_hosts=frozenset(h.lower() for h in settings.image_fetch_allowed_hosts),
            connect_timeout=settings.image_fetch_connect_timeout_seconds,
            total_timeout=settings.image_fetch_timeout_seconds,
            max_redirects=settings.image_fetch_max_redirects,
            max_bytes=settings.max_image_bytes,
        ))
        self._pool = ThreadPoolExecutor(settings.image_decode_threads, thread_name_prefix="image-decode")

    async def load(self, url: str, param: str) -> Image.Image:
        """`param` names the request field (e.g. messages[0].content[1]) in any error."""
        loop = asyncio.get_running_loop()
        if url[:5].lower() == "data:":
            raw = await loop.run_in_executor(self._pool, data_url_bytes, url, self.limits.max_bytes, param)
        else:
            raw = await self._fetcher.fetch(url, param)
        started = time.perf_counter()
        image = await loop.run_in_executor(self._pool, decode_image, raw, self.limits, param)
        self._metrics.image_decode_seconds.observe(time.perf_counter() - started)
        self._metrics.image_bytes.observe(len(raw))
        return image

    async def aclose(self) -> None:
        await self._fetcher.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)


def data_url_bytes(url: str, max_bytes: int, param: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequest("malformed data: URL; expected data:image/<type>;base64,<data>", param=param,
                             code="invalid_image_url")
    mime = match["mime"].lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise UnsupportedMediaType(f"{mime} is not an image type", param=param, code="unsupported_media_type")
    encoded = url[match.end():]
    if len(encoded) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(f"image is over the {max_bytes} byte limit", param=param, code="image_too_large")
    return base64_bytes(encoded, param)


def base64_bytes(encoded: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image data is not valid base64", param=param, code="invalid_image") from None
