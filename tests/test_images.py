"""Tongue photographs: every accepted format, safe decoding, remote URLs, and the /v1/vision/analyze endpoint."""

from __future__ import annotations

import base64
import io
import os
import struct
import time
import zlib

import pillow_heif
import pytest
from conftest import image_data_url, tongue_photo
from local_http import LocalHTTPServer, QuietHandler
from PIL import Image


USER_TEXT = {"type": "text", "text": "请从中医角度解读这张舌苔。"}


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _ask(http, url: str, **extra):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, USER_TEXT]}],
            "max_tokens": 2} | extra
    return http.post("/v1/chat/completions", json=body)


def _red_over_blue(width=120, height=80) -> Image.Image:
    image = Image.new("RGB", (width, height), (220, 0, 0))
    image.paste((0, 0, 220), (0, height // 2, width, height))
    return image


def test_exif_rotation_is_applied(server, received_images):
    upright = _red_over_blue()
    stored = upright.rotate(90, expand=True)  # what a phone writes: pixels sideways, orientation in EXIF
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    with server.client() as http:
        assert _ask(http, _url(_encoded(stored, "JPEG", exif=exif, quality=95), "image/jpeg")).status_code == 200
    image = received_images[-1]
    assert image.width > image.height
    top, bottom = image.getpixel((image.width // 2, 2)), image.getpixel((image.width // 2, image.height - 3))
    assert top[0] > 150 and top[2] < 80, top
    assert bottom[2] > 150 and bottom[0] < 80, bottom


def test_transparency_is_flattened_onto_white(server, received_images):
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((200, 50, 50, 255), (25, 25, 75, 75))
    with server.client() as http:
        assert _ask(http, _url(_encoded(image, "PNG"), "image/png")).status_code == 200
    received = received_images[-1]
    assert received.mode == "RGB"
    assert received.getpixel((1, 1)) == (255, 255, 255)
    assert received.getpixel((received.width // 2, received.height // 2))[0] > 150


@pytest.mark.parametrize("fmt, mime", [("HEIF", "image/heic"), ("GIF", "image/gif"), ("BMP", "image/bmp"),
                                       ("WEBP", "image/webp"), ("JPEG", "image/jpeg")])
def test_formats_are_accepted(server, received_images, fmt, mime):
    pillow_heif.register_heif_opener()
    with server.client() as http:
        response = _ask(http, _url(_encoded(tongue_photo(), fmt), mime))
    assert response.status_code == 200, response.text
    assert received_images[-1].mode == "RGB"


def test_tiny_and_twelve_megapixel_photos_are_resized_into_bounds(server, received_images):
    settings = server.settings
    with server.client() as http:
        assert _ask(http, _url(_encoded(Image.new("RGB", (1, 1), (200, 90, 90)), "PNG"), "image/png")).status_code == 200
        big = tongue_photo(4000, 3000)
        assert _ask(http, _url(_encoded(big, "JPEG", quality=80), "image/jpeg")).status_code == 200
    small, large = received_images[-2:]
    for image in (small, large):
        assert settings.image_min_pixels <= image.width * image.height <= settings.image_max_pixels
        assert image.width % 28 == 0 and image.height % 28 == 0
    assert abs(large.width / large.height - 4 / 3) < 0.2


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decompression bomb as far as any decoder is concerned."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_and_byte_cap_are_413(start_server):
    server = start_server(max_image_bytes=4096)
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    with server.client() as http:
        bomb = _ask(http, _url(_png_header_only(50_000, 50_000), "image/png"))
        assert bomb.status_code == 413 and "64000000 pixel limit" in bomb.json()["error"]["message"]
        too_big = _ask(http, _url(_encoded(noise, "PNG"), "image/png"))
        assert too_big.status_code == 413 and "4096 byte limit" in too_big.json()["error"]["message"]


# --- remote URLs -------------------------------------------------------------------------------------------------
class _ImageHost(QuietHandler):
    jpeg = _encoded(tongue_photo(), "JPEG")

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/tongue.jpg":
            self._send(200, "image/jpeg", self.jpeg)
        elif self.path == "/page":
            self._send(200, "text/html", b"<html>not a photo</html>")
        elif self.path == "/slow.jpg":
            time.sleep(3)
            self._send(200, "image/jpeg", self.jpeg)
        elif self.path == "/endless.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"\xff" * 65536)
            except OSError:
                pass
        elif self.path.startswith("/hop/"):
            left = int(self.path.rsplit("/", 1)[1])
            target = "/tongue.jpg" if left == 0 else f"/hop/{left - 1}"
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
        elif self.path == "/to-localhost":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/tongue.jpg")
            self.end_headers()
        else:
            self._send(404, "text/plain", b"no")

    def _send(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)



@pytest.fixture
def image_host():
    httpd = LocalHTTPServer(_ImageHost)
    yield httpd.url
    httpd.close()


def test_private_addresses_are_refused_by_default(server, image_host):
    with server.client() as http:
        for url, address in [(f"{image_host}/tongue.jpg", "127.0.0.1"),
                             ("http://169.254.169.254/latest/meta-data/", "169.254.169.254")]:
            response = _ask(http, url)
            assert response.status_code == 400
            message = response.json()["error"]["message"]
            assert address in message and "refused" in message
            assert response.json()["error"]["code"] == "image_fetch_failed"


def test_allow_list_lets_a_host_through_and_every_hop_is_checked(start_server, image_host):
    server = start_server(image_fetch_allowed_hosts="127.0.0.1", image_fetch_max_redirects=3)
    reply = server.openai().chat.completions.create(
        model=server.settings.model_name, max_tokens=2,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{image_host}/tongue.jpg"}}, USER_TEXT]}],
    )
    assert reply.usage.prompt_tokens > 20
    with server.client() as http:
        assert _ask(http, f"{image_host}/hop/2").status_code == 200
        too_many = _ask(http, f"{image_host}/hop/5")
        assert too_many.status_code == 400 and "more than 3 redirects" in too_many.json()["error"]["message"]
        elsewhere = _ask(http, f"{image_host}/to-localhost")
        assert elsewhere.status_code == 400 and "'localhost'" in elsewhere.json()["error"]["message"]
        page = _ask(http, f"{image_host}/page")
        assert page.status_code == 415 and "text/html" in page.json()["error"]["message"]
        missing = _ask(http, f"{image_host}/nothing.jpg")
        assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]


def test_slow_server_times_out_and_endless_body_is_capped(start_server, image_host):
    server = start_server(image_fetch_allowed_hosts="127.0.0.1", image_fetch_timeout_seconds=0.5,
                          max_image_bytes=256 * 1024)
    with server.client() as http:
        started = time.perf_counter()
        slow = _ask(http, f"{image_host}/slow.jpg")
        assert slow.status_code == 400 and "timed out after 0.5 s" in slow.json()["error"]["message"]
        assert time.perf_counter() - started < 2
        endless = _ask(http, f"{image_host}/endless.jpg")
        assert endless.status_code == 413 and "262144 byte limit" in endless.json()["error"]["message"]
        assert http.get("/health").status_code == 200


def test_remote_fetching_can_be_switched_off(start_server, image_host):
    server = start_server(image_fetch_enabled=False, image_fetch_allowed_hosts="127.0.0.1")
    with server.client() as http:
        response = _ask(http, f"{image_host}/tongue.jpg")
    assert response.status_code == 400 and "switched off" in response.json()["error"]["message"]


# --- /v1/vision/analyze ----------------------------------------------------------------------------------------
def test_vision_analyze_multipart_and_json(server, received_images):
    jpeg = _encoded(tongue_photo(), "JPEG")
    with server.client() as http:
        form = http.post("/v1/vision/analyze", files={"image": ("tongue.jpg", jpeg, "image/jpeg")},
                         data={"question": "舌苔厚吗？", "max_tokens": "5"})
        assert form.status_code == 200, form.text
        answer = form.json()
        assert set(answer) >= {"analysis", "question", "model", "usage"}
        assert answer["question"] == "舌苔厚吗？" and answer["model"] == server.settings.model_name
        assert answer["usage"]["completion_tokens"] <= 5 and answer["usage"]["prompt_tokens"] > 20

        plain = http.post("/v1/vision/analyze", json={"image": base64.b64encode(jpeg).decode(), "max_tokens": 3})
        assert plain.status_code == 200 and plain.json()["question"] == "请从中医角度解读这张舌苔。"
        query = http.post("/v1/vision/analyze", json={"image": image_data_url(tongue_photo()), "query": "舌色？",
                                                      "max_tokens": 3})
        assert query.json()["question"] == "舌色？"
    assert len(received_images) == 3


def test_vision_analyze_streams_and_refuses_bad_input(server):
    with server.client() as http:
        with http.stream("POST", "/v1/vision/analyze", json={"image": image_data_url(tongue_photo()),
                                                              "max_tokens": 4, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and lines[-1] == "data: [DONE]"
        assert '"usage"' in lines[-2]
        missing = http.post("/v1/vision/analyze", data={"question": "?"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"
        text = http.post("/v1/vision/analyze", files={"image": ("notes.txt", b"hello", "text/plain")})
        assert text.status_code == 415 and text.json()["error"]["param"] == "image"
        fake = http.post("/v1/vision/analyze", files={"image": ("x.jpg", b"not really a jpeg", "image/jpeg")})
        assert fake.status_code == 415
        no_json = http.post("/v1/vision/analyze", json={"question": "?"})
        assert no_json.status_code == 400 and no_json.json()["error"]["param"] == "image"
