"""Image intake: `data:` URLs → upright RGB PIL images, refusing what is too large or not an image.

Runs in a worker thread (callers use `asyncio.to_thread`): decoding a phone photo takes tens of milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_decoded_pixels: int = 64_000_000  # refuse decompression bombs before decoding; a 48 MP phone photo fits


def decode_image_url(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """Decode one `image_url.url`; `param` names the request field in errors."""
    if not url.startswith("data:"):
        raise InvalidRequest(
            "only data: URLs (base64 PNG, JPEG or WebP) are accepted for images", param=param, code="invalid_image_url"
        )
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequest("malformed data: URL; expected data:image/<type>;base64,<data>", param=param)
    if match["mime"] and not match["mime"].startswith("image/"):
        raise UnsupportedMediaType(f"{match['mime']} is not an image type", param=param, code="unsupported_media_type")
    if len(match["data"]) * 3 // 4 > limits.max_bytes:
        raise PayloadTooLarge(f"image is larger than the {limits.max_bytes} byte limit", param=param)
    try:
        raw = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image data is not valid base64", param=param) from None
    return decode_image_bytes(raw, limits, param)


def decode_image_bytes(raw: bytes, limits: ImageLimits, param: str) -> Image.Image:
    if len(raw) > limits.max_bytes:
        raise PayloadTooLarge(f"image is larger than the {limits.max_bytes} byte limit", param=param)
    try:
        image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise UnsupportedMediaType("the data is not an image this server can read", param=param) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"image could not be decoded (truncated or corrupt): {exc}", param=param) from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"{image.format} images are not accepted; send PNG, JPEG or WebP", param=param)
    width, height = image.size
    if width * height > limits.max_decoded_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} pixels, over the {limits.max_decoded_pixels} pixel limit", param=param
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"image could not be decoded (truncated or corrupt): {exc}", param=param) from None
    return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation (phones store photos sideways) and flatten transparency onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
