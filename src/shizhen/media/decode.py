"""Encoded bytes → an upright RGB image within the processor's pixel bounds, refusing what is unsafe to decode.

Every check that can be made from the header (format, byte size, pixel count) is made before any pixel is decoded,
so a decompression bomb costs nothing. Runs in the intake's thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

pillow_heif.register_heif_opener()  # iPhones send HEIC

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "HEIF", "MPO"})  # MPO: JPEG from some cameras
PATCH_FACTOR = 28  # Qwen2.5-VL: 14-pixel patches merged 2x2 into one visual token


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_decoded_pixels: int
    min_pixels: int
    max_pixels: int


def decode_image(raw: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Decode, orient, flatten and resize one image; `param` names the request field in errors."""
    if len(raw) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(raw)} bytes, over the {limits.max_bytes} byte limit", param=param,
                              code="image_too_large")
    image = _open(raw, limits, param)
    try:
        image.seek(0)  # animated GIF/WebP: the first frame
        if image.format == "JPEG":  # decode straight at 1/2, 1/4 or 1/8 scale: a 12 MP photo costs a fraction
            image.draft("RGB", _target_size(image, limits, param))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"image could not be decoded (truncated or corrupt): {exc}", param=param,
                             code="invalid_image") from None
    return _within_bounds(_upright_rgb(image), limits, param)


def _open(raw: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Read only the header: format and size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(param, limits) from None
    except UnidentifiedImageError:
        raise UnsupportedMediaType("the data is not an image this server can read (PNG, JPEG, WebP, GIF, BMP, HEIC)",
                                   param=param, code="unsupported_image_format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"image could not be decoded (truncated or corrupt): {exc}", param=param,
                             code="invalid_image") from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"{image.format} images are not accepted; send PNG, JPEG, WebP, GIF, BMP or HEIC",
                                   param=param, code="unsupported_image_format")
    width, height = image.size
    if width * height > limits.max_decoded_pixels:
        raise _too_many_pixels(param, limits, f"{width}x{height} = {width * height} pixels")
    return image


def _too_many_pixels(param: str, limits: ImageLimits, size: str = "too many pixels") -> PayloadTooLarge:
    return PayloadTooLarge(f"image is {size}, over the {limits.max_decoded_pixels} pixel limit", param=param,
                           code="image_too_large")


def _upright_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation (phones store photos sideways) and flatten transparency onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _target_size(image: Image.Image, limits: ImageLimits, param: str) -> tuple[int, int]:
    """(width, height) the processor would resize to: multiples of 28 within the pixel bounds."""
    try:
        height, width = smart_resize(image.height, image.width, PATCH_FACTOR, limits.min_pixels, limits.max_pixels)
    except ValueError as exc:  # an aspect ratio over 200:1
        raise InvalidRequest(f"image shape not accepted: {exc}", param=param, code="invalid_image") from None
    return width, height


def _within_bounds(image: Image.Image, limits: ImageLimits, param: str) -> Image.Image:
    """Resize here, in the pool, so the processor's own resize has nothing left to do."""
    size = _target_size(image, limits, param)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
