"""`GET /`: the consultation page (static; it calls the API with the key the user enters)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@cache
def _page() -> str:
    return (files("shizhen.web") / "index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def consultation_page() -> HTMLResponse:
    """The chat page for text and tongue-photo consultations."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
