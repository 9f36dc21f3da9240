"""Many concurrent streaming chat completions from one process, timing each content chunk: the HTTP side of
http_overhead.py, which runs several of these processes so that the client is never what limits the server."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def _one(client: httpx.AsyncClient, body: dict) -> dict:
    submitted = time.monotonic()
    chunks: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                chunks.append(time.monotonic())
            elif '"usage":{' in line:
                tokens = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
    return {"submitted": submitted, "chunks": chunks, "tokens": tokens}


async def _streams(url: str, body: dict, arrivals: list[float]) -> list[dict]:
    limits = httpx.Limits(max_connections=len(arrivals), max_keepalive_connections=len(arrivals))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def at(arrival: float) -> dict:
            await asyncio.sleep(max(0.0, arrival - time.monotonic()))
            return await _one(client, body)

        return await asyncio.gather(*(at(arrival) for arrival in arrivals))


def main() -> None:
    """`python sse_client.py URL BODY ARRIVALS`: one stream of the request BODY (JSON) at each of the ARRIVALS (a
    JSON list of time.monotonic values, shared by all processes); prints their timelines as JSON."""
    url, body, arrivals = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps(asyncio.run(_streams(url, body, arrivals))))


if __name__ == "__main__":
    main()
