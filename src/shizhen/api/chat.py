"""`POST /v1/chat/completions` and `POST /v1/completions`: thin adapters from HTTP to the chat service."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..protocol import ChatCompletion, ChatCompletionRequest, CompletionRequest, TextCompletion
from ..streaming import ChatChunks, TextChunks
from .deps import Chat

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, chat: Chat):
    """OpenAI chat completions, streaming or not; a client that disconnects stops its generation."""
    prepared = await chat.prepare(body)
    if body.stream:
        return StreamingResponse(
            chat.stream(prepared, ChatChunks, body.include_usage_chunk, body.continuous_usage, body.tool_use),
            media_type="text/event-stream", headers=SSE_HEADERS
        )
    return await unless_disconnected(request, chat.complete(prepared, body.tool_use))


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request, chat: Chat) -> TextCompletion | None:
    """Legacy text completions: a raw prompt (text or token ids, one per request), no chat template."""
    prepared = await chat.prepare_text(body)
    if body.stream:
        return StreamingResponse(chat.stream(prepared, TextChunks, body.include_usage_chunk, body.continuous_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await unless_disconnected(request, chat.complete_text(prepared))


async def unless_disconnected(request: Request, work) -> ChatCompletion | None:
    """Runs `work`, cancelling it (and so its engine request) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
