"""`/v1/models` in OpenAI's shape, with what clients need to adapt: context length and image limits."""

from __future__ import annotations

from fastapi import APIRouter

from ..protocol import ModelCard, ModelList
from .context import ServerContext
from .deps import Chat, Context

router = APIRouter()


def model_card(context: ServerContext) -> ModelCard:
    settings = context.settings
    random_model = context.random_test_model
    return ModelCard(
        id=settings.model_name,
        created=int(context.created),
        owned_by="FreedomIntelligence" if not random_model else "shizhen-tests",
        root=settings.model,
        max_model_len=settings.max_context_length,
        random_test_model=random_model,
        description=(
            "RANDOM TEST MODEL: tiny random weights built offline; its output is gibberish"
            if random_model
            else "ShizhenGPT, a Traditional Chinese Medicine vision-language model"
        ),
        limits=context.limits,
    )


@router.get("/v1/models")
async def list_models(context: Context) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[model_card(context)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, context: Context, chat: Chat) -> ModelCard:
    """One model by id; 404 for any other."""
    chat.check_model(model_id)
    return model_card(context)
