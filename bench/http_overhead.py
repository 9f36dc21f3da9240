"""What the HTTP layer adds: the same generation through the server vs. called directly, on the tiny model (CPU).

Prints one JSON line per mode and a summary; `--json PATH` also writes them to a file.
The server runs in its own process (the real `shizhen serve` command), as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import emit, serve_tiny, write_json

from shizhen.engine.engine import Engine, EngineConfig, EngineState
from shizhen.engine.loader import load_model
from shizhen.engine.prompt import ChatTurn
from shizhen.engine.request import GenerationRequest
from shizhen.engine.sampling import SamplingParams
from shizhen.tiny_checkpoint import build_tiny_checkpoint

QUESTION = "舌红苔黄腻，是什么证型？"
PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}


def direct_seconds(checkpoint: Path, tokens: int, repeats: int) -> list[float]:
    """Prompt building plus generation through the engine in-process: everything but HTTP."""
    engine = Engine(lambda report_phase: load_model(str(checkpoint)), EngineConfig(
        max_len=4096, max_num_seqs=8, image_min_pixels=PIXELS["min_pixels"], image_max_pixels=PIXELS["max_pixels"]))
    engine.start()
    while engine.state is EngineState.LOADING:
        time.sleep(0.01)
    builder = engine.prompt_builder
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)

    async def one() -> float:
        started = time.perf_counter()
        prompt = await asyncio.to_thread(builder.build, [ChatTurn("user", (QUESTION,))])
        stream = engine.submit(GenerationRequest("bench", prompt, params))
        while not (output := await stream.next()).finish_reason:
            pass
        assert output.completion_tokens == tokens
        return time.perf_counter() - started

    async def run() -> list[float]:
        return [await one() for _ in range(repeats + 2)]

    try:
        return asyncio.run(run())[2:]  # the first runs warm up
    finally:
        engine.stop()


def http_seconds(url: str, tokens: int, repeats: int, stream: bool) -> list[float]:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    timings = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(repeats + 2):
            started = time.perf_counter()
            if stream:
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    for _line in response.iter_lines():
                        pass
            else:
                assert client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == tokens
            timings.append(time.perf_counter() - started)
    return timings[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_tiny_checkpoint(Path(folder) / "tiny")
        direct = statistics.median(direct_seconds(checkpoint, args.tokens, args.requests))
        server = serve_tiny(checkpoint, args.port, "--image-min-pixels", str(PIXELS["min_pixels"]),
                            "--image-max-pixels", str(PIXELS["max_pixels"]))
        try:
            url = f"http://127.0.0.1:{args.port}"
            plain = statistics.median(http_seconds(url, args.tokens, args.requests, stream=False))
            streamed = statistics.median(http_seconds(url, args.tokens, args.requests, stream=True))
        finally:
            server.terminate()
            server.wait(10)
    rows: list[dict] = []
    emit(rows, {"mode": "direct", "median_s": round(direct, 5), "tokens": args.tokens})
    emit(rows, {"mode": "http", "median_s": round(plain, 5),
                "overhead_ms_per_request": round((plain - direct) * 1e3, 2)})
    emit(rows, {"mode": "http_stream", "median_s": round(streamed, 5),
                "overhead_ms_per_request": round((streamed - direct) * 1e3, 2),
                "overhead_us_per_streamed_token": round((streamed - plain) / args.tokens * 1e6, 1)})
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
