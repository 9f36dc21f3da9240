"""Image intake cost (decode + orient + resize of a 12-megapixel JPEG) and whether it slows concurrent text requests.

Prints JSON lines; `--json PATH` also writes them. CPU only; the server is the real `shizhen serve` on the tiny model.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import emit, serve_tiny, write_json
from PIL import Image, ImageDraw

from shizhen.config import Settings
from shizhen.media.decode import ImageLimits, decode_image
from shizhen.tiny_checkpoint import build_tiny_checkpoint


def phone_photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    image = Image.effect_noise((width, height), 40).convert("RGB")
    ImageDraw.Draw(image).ellipse((width * 0.2, height * 0.1, width * 0.8, height * 0.95), fill=(205, 110, 120))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def intake_cost(raw: bytes, repeats: int) -> dict:
    defaults = Settings()
    limits = ImageLimits(defaults.max_image_bytes * 4, defaults.max_image_decoded_pixels, defaults.image_min_pixels,
                         defaults.image_max_pixels)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        image = decode_image(raw, limits, "bench")
        timings.append(time.perf_counter() - started)
    return {"bench": "intake_12mp_jpeg", "jpeg_bytes": len(raw), "resized_to": list(image.size),
            "median_ms": round(statistics.median(timings) * 1e3, 1), "max_ms": round(max(timings) * 1e3, 1)}


def text_latencies(url: str, count: int) -> list[float]:
    body = {"messages": [{"role": "user", "content": "舌红苔黄"}], "max_tokens": 16, "ignore_eos": True}
    timings = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            timings.append(time.perf_counter() - started)
    return timings


def image_load(url: str, data_url: str, max_tokens: int, stop: threading.Event, sent: list[int]) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}],
            "max_tokens": max_tokens}
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            client.post("/v1/chat/completions", json=body)
            sent.append(1)


def text_latencies_during_uploads(url: str, data_url: str, args, max_tokens: int) -> tuple[list[float], int]:
    stop, sent = threading.Event(), []
    loaders = [threading.Thread(target=image_load, args=(url, data_url, max_tokens, stop, sent))
               for _ in range(args.image_clients)]
    for loader in loaders:
        loader.start()
    time.sleep(1)
    timings = text_latencies(url, args.text_requests)
    stop.set()
    for loader in loaders:
        loader.join()
    return timings, len(sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--text-requests", type=int, default=40)
    parser.add_argument("--image-clients", type=int, default=4)
    parser.add_argument("--port", type=int, default=8932)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    raw = phone_photo_jpeg()
    rows: list[dict] = []
    emit(rows, intake_cost(raw, args.repeats))
    data_url = f"data:image/jpeg;base64,{base64.b64encode(raw).decode()}"
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_tiny_checkpoint(Path(folder) / "tiny")
        server = serve_tiny(checkpoint, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            text_latencies(url, 5)
            alone = text_latencies(url, args.text_requests)
            # uploads decoded, then refused before the engine (max_tokens over the context): intake cost alone
            intake_only, intake_sent = text_latencies_during_uploads(url, data_url, args, max_tokens=8000)
            # uploads that also run the vision encoder and a token on the engine, ahead of the text requests
            with_engine, engine_sent = text_latencies_during_uploads(url, data_url, args, max_tokens=1)
        finally:
            server.terminate()
            server.wait(10)
    for name, timings, uploads in (("text_alone", alone, 0),
                                   ("text_during_12mp_uploads_refused_before_engine", intake_only, intake_sent),
                                   ("text_during_12mp_uploads_through_engine", with_engine, engine_sent)):
        emit(rows, {"bench": name, "median_ms": round(statistics.median(timings) * 1e3, 1),
                    "p95_ms": round(sorted(timings)[int(len(timings) * 0.95) - 1] * 1e3, 1),
                    "image_requests_done": uploads, "image_clients": args.image_clients if uploads else 0})
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
