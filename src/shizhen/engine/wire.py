"""The messages between the API process and the engine core process: msgpack, never pickle.

Every message's first frame is a list `[incarnation, kind, payload]`: the incarnation numbers engine processes, so
what a dead one left in a socket is told apart from what its replacement says. A request's prompt tensors follow as
frames of their own, sent without copying (a photo's pixel values are megabytes), and are named in the payload by
(dtype, shape, frame index).
"""

from __future__ import annotations

from dataclasses import asdict, fields

import msgpack
import torch

from .prompt import PromptInputs
from .request import GenerationRequest
from .sampling import SamplingParams

# API → engine
ADD, ABORT, SHUTDOWN = "add", "abort", "shutdown"
# engine → API
PHASE, READY, FAILED, OUTPUTS = "phase", "ready", "failed", "outputs"

_PROMPT_TENSORS = ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")
_DTYPES = {str(dtype): dtype for dtype in (torch.long, torch.int32, torch.float32, torch.bfloat16, torch.float16)}


def pack(incarnation: int, kind: str, payload=None) -> bytes:
    return msgpack.packb([incarnation, kind, payload])


def unpack(data: bytes) -> tuple[int, str, object]:
    incarnation, kind, payload = msgpack.unpackb(data)
    return incarnation, kind, payload


def encode_request(request: GenerationRequest) -> tuple[dict, list[memoryview]]:
    """The request's payload, and its tensors' frames (numbered from 1: frame 0 is the message itself)."""
    prompt = request.prompt
    frames: list[memoryview] = []
    encoded = {name: _encode_tensor(getattr(prompt, name), frames) for name in _PROMPT_TENSORS}
    encoded |= {"image_token_id": prompt.image_token_id, "image_hashes": list(prompt.image_hashes)}
    payload = {"request_id": request.request_id, "arrived": request.arrived, "sampling": asdict(request.sampling),
               "prompt": encoded}
    return payload, frames


def decode_request(payload: dict, frames: list) -> GenerationRequest:
    sampling = payload["sampling"]
    known = {field.name for field in fields(SamplingParams)}
    if unknown := set(sampling) - known:
        raise ValueError(f"unknown sampling fields {sorted(unknown)}")
    sampling = {name: tuple(value) if isinstance(value, list) else value for name, value in sampling.items()}
    prompt = payload["prompt"]
    return GenerationRequest(
        request_id=payload["request_id"],
        prompt=PromptInputs(**{name: _decode_tensor(prompt[name], frames) for name in _PROMPT_TENSORS},
                            image_token_id=prompt["image_token_id"],
                            image_hashes=tuple(prompt["image_hashes"])),
        sampling=SamplingParams(**sampling),
        arrived=payload["arrived"],
    )


def _encode_tensor(tensor: torch.Tensor | None, frames: list[memoryview]) -> list | None:
    if tensor is None:
        return None
    tensor = tensor.detach().cpu().contiguous()
    frames.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return [str(tensor.dtype), list(tensor.shape), len(frames)]


def _decode_tensor(encoded: list | None, frames: list) -> torch.Tensor | None:
    if encoded is None:
        return None
    dtype, shape, index = encoded
    data = frames[index]
    if not len(data):
        return torch.empty(shape, dtype=_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=_DTYPES[dtype]).reshape(shape)
