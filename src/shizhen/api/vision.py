"""`POST /v1/vision/analyze`: tongue-photo analysis as multipart or JSON, through the chat service's one path."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..errors import InvalidRequest
from ..protocol import ChatCompletionRequest, VisionAnalysis, VisionAnalyzeRequest
from ..streaming import ChatChunks
from .chat import SSE_HEADERS, unless_disconnected
from .deps import Chat

router = APIRouter()
RESPONSE_FORMAT = {"type": "object", "description": 'as in chat completions: {"type": "json_schema", "json_schema": '
                   '{"name": ..., "schema": {...}}} or {"type": "json_object"}; JSON text in a form'}
JSON_FIELDS = VisionAnalyzeRequest.model_json_schema()
JSON_FIELDS.pop("$defs", None)
JSON_FIELDS["properties"]["response_format"] = RESPONSE_FORMAT
FORM_FIELDS = {  # the multipart form carries VisionAnalyzeRequest's fields, with `image` as a file
    "image": {"type": "string", "format": "binary", "description": "the photo (JPEG, PNG, WebP, HEIC, ...)"},
    **{name: field for name, field in JSON_FIELDS["properties"].items() if name != "image"},
    "response_format": RESPONSE_FORMAT | {"type": "string"},
}
REQUEST_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": FORM_FIELDS}},
    "application/json": {"schema": JSON_FIELDS},
}}


@router.post("/v1/vision/analyze", response_model=None, openapi_extra={"requestBody": REQUEST_BODY})
async def analyze_tongue_photo(request: Request, chat: Chat):
    """Read one photo (default question: 请从中医角度解读这张舌苔。) and answer {analysis, question, model, usage}."""
    vision = await _parse(request)
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _as_url(vision.image)}},
            {"type": "text", "text": vision.asked},
        ]}],
        max_tokens=vision.max_tokens,
        temperature=vision.temperature,
        stream=vision.stream,
        response_format=vision.response_format,
    )
    prepared = await chat.prepare(body, image_param="image", text_param="question")
    if vision.stream:
        return StreamingResponse(chat.stream(prepared, ChatChunks, include_usage=True), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    completion = await unless_disconnected(request, chat.complete(prepared))
    if completion is None:
        return None
    return VisionAnalysis(
        analysis=completion.choices[0].message.content,
        question=vision.asked,
        model=completion.model,
        finish_reason=completion.choices[0].finish_reason,
        usage=completion.usage,
    )


async def _parse(request: Request) -> VisionAnalyzeRequest:
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return await _from_form(request)
        return VisionAnalyzeRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _from_form(request: Request) -> VisionAnalyzeRequest:
    form = await request.form()
    upload = form.get("image")
    if isinstance(upload, UploadFile):
        mime = upload.content_type or "application/octet-stream"
        image = f"data:{mime};base64,{base64.b64encode(await upload.read()).decode()}"
    elif isinstance(upload, str) and upload:
        image = upload
    else:
        raise InvalidRequest("send the photo as a file in the form field 'image'", param="image")
    fields = {key: value for key, value in form.items() if key != "image" and isinstance(value, str) and value}
    return VisionAnalyzeRequest.model_validate({**fields, "image": image})


def _as_url(image: str) -> str:
    """Bare base64 is accepted as well as data: and http(s) URLs."""
    if image.startswith(("data:", "http://", "https://")):
        return image
    return f"data:application/octet-stream;base64,{image}"
