"""Conversation → model inputs, through the checkpoint's own chat template and processor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

Part = str | Image.Image


@dataclass(frozen=True)
class ChatTurn:
    """One message as the engine sees it: a role and its text and images, in order."""

    role: str  # "system" | "user" | "assistant"
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class PromptInputs:
    """Everything prefill needs, on the CPU; `input_ids` already holds one placeholder per image token."""

    input_ids: torch.Tensor  # (1, prompt_len)
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_token_id: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_image_tokens(self) -> int:
        if self.image_token_id is None:
            return 0
        return int((self.input_ids == self.image_token_id).sum())


class PromptBuilder:
    """Applies the chat template and runs the processor (tokenizer + image resize/normalise). CPU-only work."""

    def __init__(self, processor, image_min_pixels: int, image_max_pixels: int):
        self._processor = processor
        self._image_kwargs = {"min_pixels": image_min_pixels, "max_pixels": image_max_pixels}

    def build(self, turns: list[ChatTurn]) -> PromptInputs:
        messages = [{"role": turn.role, "content": _template_content(turn.parts)} for turn in turns]
        text = self._processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = [part for turn in turns for part in turn.parts if isinstance(part, Image.Image)]
        if not images:
            encoded = self._processor(text=[text], return_tensors="pt")
            return PromptInputs(input_ids=encoded["input_ids"])
        encoded = self._processor(text=[text], images=images, return_tensors="pt", **self._image_kwargs)
        return PromptInputs(
            input_ids=encoded["input_ids"],
            mm_token_type_ids=encoded["mm_token_type_ids"],
            pixel_values=encoded["pixel_values"],
            image_grid_thw=encoded["image_grid_thw"],
            image_token_id=self._processor.image_token_id,
        )


def _template_content(parts: tuple[Part, ...]) -> str | list[dict]:
    if all(isinstance(part, str) for part in parts):
        return "".join(parts)
    return [{"type": "image"} if isinstance(part, Image.Image) else {"type": "text", "text": part} for part in parts]
