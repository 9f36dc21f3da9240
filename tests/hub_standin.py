"""A local stand-in for the Hugging Face Hub: serves a checkpoint folder the way the hub serves files (repo
metadata with sizes and LFS hashes, `resolve` URLs with commit/ETag/size headers, Range requests) and injects the
faults the model store must survive."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from local_http import LocalHTTPServer, QuietHandler


class StandInHub:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        self.commit = hashlib.sha1("".join(sorted(self.files)).encode()).hexdigest()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.fail_next = 0  # answer this many requests with 503
        self.drop_once: dict[str, int] = {}  # file → bytes sent before the connection is cut, once
        self.corrupt: dict[str, int] = {}  # file → times its bytes are served flipped (same length)
        self.advertised_size: dict[str, int] = {}  # file → size claimed in the metadata
        self.stall: dict[str, threading.Event] = {}  # file → its body waits until the event is set
        self.rate: dict[str, int] = {}  # file → bytes per second its body is sent at, while the entry stays
        self.authorizations: list[str | None] = []  # the Authorization header of every request
        hub = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                hub._handle(self, body=True)

            def do_HEAD(self):  # noqa: N802
                hub._handle(self, body=False)

        self._server = LocalHTTPServer(Handler)
        self.url = self._server.url

    def close(self) -> None:
        self._server.close()

    def lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")

    def _handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = request.path.split("?")[0]
        self.requests.append((request.command, path, request.headers.get("Range")))
        self.authorizations.append(request.headers.get("Authorization"))
        if self.fail_next > 0:
            self.fail_next -= 1
            return self._send(request, 503, b'{"error": "overloaded"}', {"Content-Type": "application/json"}, body)
        if path.startswith(f"/api/models/{self.repo_id}"):
            return self._send(request, 200, json.dumps(self._metadata()).encode(),
                              {"Content-Type": "application/json"}, body)
        match = re.match(rf"^/{re.escape(self.repo_id)}/resolve/[^/]+/(.+)$", path)
        if not match or match[1] not in self.files:
            return self._send(request, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
        self._send_file(request, match[1], body)

    def _metadata(self) -> dict:
        siblings = []
        for name, data in self.files.items():
            size = self.advertised_size.get(name, len(data))
            entry = {"rfilename": name, "size": size, "blobId": hashlib.sha1(data).hexdigest()}
            if self.lfs(name):
                entry["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "siblings": siblings}

    def _send_file(self, request: BaseHTTPRequestHandler, name: str, body: bool) -> None:
        data = self.files[name]
        etag = hashlib.sha256(data).hexdigest() if self.lfs(name) else hashlib.sha1(data).hexdigest()
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if self.lfs(name):
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        if body and self.corrupt.get(name, 0) > 0:
            self.corrupt[name] -= 1
            data = data[:-64] + bytes(b ^ 0xFF for b in data[-64:])  # the tensor data, not the header
        start = 0
        if body and (wanted := request.headers.get("Range")):
            start = int(re.match(r"bytes=(\d+)-", wanted)[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        part = data[start:]
        status = 206 if start else 200
        if not body:
            return self._send(request, status, b"", headers | {"Content-Length": str(len(data))}, False)
        if name in self.stall:
            self.stall[name].wait(30)
        cut = self.drop_once.pop(name, None)
        if cut is not None:
            request.send_response(status)
            for key, value in (headers | {"Content-Length": str(len(part))}).items():
                request.send_header(key, value)
            request.end_headers()
            request.wfile.write(part[:cut])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(2)
            return
        if name in self.rate:
            return self._send_slowly(request, status, part, headers, name)
        self._send(request, status, part, headers, True)

    def _send_slowly(self, request, status: int, part: bytes, headers: dict, name: str) -> None:
        """A tenth of a second's worth at a time, at full speed again once the rate is lifted."""
        self._send(request, status, b"", headers | {"Content-Length": str(len(part))}, False)
        sent = 0
        while sent < len(part):
            rate = self.rate.get(name)
            step = len(part) - sent if rate is None else max(rate // 10, 1)
            request.wfile.write(part[sent:sent + step])
            request.wfile.flush()
            sent += step
            if rate is not None:
                time.sleep(0.1)

    @staticmethod
    def _send(request, status: int, payload: bytes, headers: dict, body: bool) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        if "Content-Length" not in headers:
            request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if body:
            request.wfile.write(payload)
