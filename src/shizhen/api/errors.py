"""Every error leaves the server in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InternalError, InvalidRequest, ServingError
from ..protocol import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)
_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def error_response(error: ServingError) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=error.message, type=error.error_type, param=error.param,
                                         code=error.code))
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=error.status, headers=headers)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """FastAPI's 422 becomes OpenAI's 400, with a message that says which field and what to fix."""
    # the deepest error is the useful one: for a union it is the branch the client meant
    first = max(exc.errors(), key=lambda error: len(error.get("loc", ())))
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    param = _param_path(location)
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "this field is required"
    extra = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return InvalidRequest(f"{param or 'body'}: {message}{extra}", param=param or None)


def _param_path(location: list[str]) -> str:
    """('messages', '0', 'content', 'list[tagged-union[..]]', '0', 'image_url', 'url') → 'messages[0].content[0].url'.

    Pydantic's union branch labels, and the tag it inserts after a tagged union's index, mean nothing to a client.
    """
    path = ""
    skip_tag = False
    for part in location:
        if part.isdigit():
            path += f"[{part}]"
        elif "[" in part or part in {"str", "int", "float", "bool", "list", "none"}:
            skip_tag = skip_tag or "tagged-union" in part
        elif skip_tag:
            skip_tag = False
        else:
            path += f".{part}" if path else part
    return path


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = ServingError(str(exc.detail))
        error.status, error.error_type = exc.status_code, _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        return error_response(error)

    app.add_middleware(UnexpectedErrors)  # added first, so it sits inside the others (the access log sees its 500)


class UnexpectedErrors:
    """An exception no handler took becomes a 500 envelope here. (Starlette's last-resort handler answers and then
    re-raises: uvicorn then closes the connection, so a keep-alive client's next request fails too.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if started:  # mid-body: no second response can be sent
                raise
            error = InternalError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
            await error_response(error)(scope, receive, send)
