"""The OpenAPI spec as the server really answers: FastAPI advertises 422 for body validation, but every refusal
here is a 400 (or 401/404/413/415/429/503) with OpenAI's error envelope."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..protocol import ErrorResponse

ERROR_RESPONSE = {"$ref": "#/components/schemas/ErrorResponse"}
REFUSALS = {
    "400": "Bad request: the message names the field (`param`)",
    "401": "Missing or wrong API key",
    "429": "Rate limited or the server's queue is full (Retry-After)",
    "503": "Loading, failed to load, or shutting down (Retry-After)",
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _spec(app)
        return app.openapi_schema

    app.openapi = openapi


def _spec(app: FastAPI) -> dict:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    envelope = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(envelope.pop("$defs", {}))
    schemas["ErrorResponse"] = envelope
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/") or "requestBody" in operation:
                for status, description in REFUSALS.items():
                    responses.setdefault(status, {"description": description,
                                                  "content": {"application/json": {"schema": ERROR_RESPONSE}}})
    return spec
