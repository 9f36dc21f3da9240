"""What the benchmarks share: JSON-line output, GPU timing of CUDA graphs and a real `shizhen serve` on the tiny
checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch


def emit(rows: list[dict], row: dict) -> None:
    """Print one result as a JSON line (as soon as it is measured) and keep it for `write_json`."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def write_json(rows: list[dict], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20) -> float:
    """GPU milliseconds per replay of `graph`, measured with CUDA events after one warm replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def serve_tiny(checkpoint: Path, port: int, *flags: str) -> subprocess.Popen:
    """The real server command in its own process, as in production; returns once /health says ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shizhen.cli", "serve", "--model", str(checkpoint), "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")
