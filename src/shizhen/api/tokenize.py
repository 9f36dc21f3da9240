"""vLLM's `/tokenize` and `/detokenize`: what a client counts or checks before it sends a conversation."""

from __future__ import annotations

from fastapi import APIRouter

from ..protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .deps import Chat

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, chat: Chat) -> TokenizeResponse:
    """The token ids of a chat (rendered by the chat template, images counted) or of a plain prompt."""
    return await chat.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, chat: Chat) -> DetokenizeResponse:
    """Token ids back to text."""
    return chat.detokenize(body)
