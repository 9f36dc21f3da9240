"""`GET /`: the consultation page, its scripts and styles under `/static` (markdown-it and DOMPurify vendored, so the
page requests nothing but its own server), and `/favicon.ico`."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

WEB = files("shizhen.web")
# The page may talk to and load from its own origin only; photos are shown from data: and blob: URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")

router = APIRouter()
static_files = StaticFiles(directory=str(WEB / "static"))


@cache
def _page() -> str:
    return (WEB / "index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def consultation_page() -> HTMLResponse:
    """The chat page for text and tongue-photo consultations."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                          "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response((WEB / "static" / "favicon.ico").read_bytes(), media_type="image/x-icon",
                    headers={"Cache-Control": "max-age=86400"})
