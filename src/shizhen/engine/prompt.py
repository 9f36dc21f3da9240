"""Conversation → model inputs, through the checkpoint's own chat template and processor."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

import torch
from PIL import Image
from tokenizers import decoders
from transformers import AutoProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

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
    image_hashes: tuple[str, ...] = ()  # per image, of its pixel values: what the engine's caches know it by

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def followed_by(self, token_ids: list[int]) -> PromptInputs:
        """This prompt with text tokens appended (a preempted sequence's output, planning's filler)."""
        if not token_ids:
            return self
        tokens = torch.tensor([token_ids], dtype=torch.long)
        token_types = None if self.mm_token_type_ids is None else torch.cat(
            [self.mm_token_type_ids, torch.zeros_like(tokens)], dim=1)
        return replace(self, input_ids=torch.cat([self.input_ids, tokens], dim=1), mm_token_type_ids=token_types)

    @property
    def num_image_tokens(self) -> int:
        if self.image_token_id is None:
            return 0
        return int((self.input_ids == self.image_token_id).sum())

    def image_spans(self) -> list[tuple[int, int]]:
        """Per image, the positions [first, end) of its placeholder tokens (images are never adjacent: each sits
        between its own vision start and end tokens)."""
        if self.image_token_id is None:
            return []
        is_image = (self.input_ids[0] == self.image_token_id).tolist()
        edges = [i for i in range(len(is_image) + 1)
                 if (is_image[i] if i < len(is_image) else False) != (is_image[i - 1] if i else False)]
        return list(zip(edges[::2], edges[1::2], strict=True))

    def image_patches(self) -> list[int]:
        """Per image, its rows of `pixel_values` (its tokens are a quarter of them: 2x2 patches merge into one)."""
        if self.image_grid_thw is None:
            return []
        return [int(t * h * w) for t, h, w in self.image_grid_thw.tolist()]


class PromptBuilder:
    """Applies the chat template and runs the processor (tokenizer + image resize/normalise). CPU-only work."""

    def __init__(self, processor, image_min_pixels: int, image_max_pixels: int):
        self._processor = processor
        self._image_kwargs = {"min_pixels": image_min_pixels, "max_pixels": image_max_pixels}
        tokenizer = processor.tokenizer
        added = {t.content for t in tokenizer.added_tokens_decoder.values()}
        special = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len,
                         reverse=True)
        self._control_tokens = re.compile("|".join(map(re.escape, special))) if special else None
        # byte-level BPE (Qwen's): one character of a vocabulary entry is one byte of text, so a text of n bytes is
        # at least n / max_token_bytes tokens, which bounds a prompt's length before tokenizing it
        self.max_token_bytes = max(len(token) for token in tokenizer.get_vocab() if token not in added)
        self.min_image_tokens = image_min_pixels // (28 * 28)  # merged 28x28 patches of the smallest image
        self._token_pieces: dict[int, tuple[str, list[int]]] = {}
        # byte-level BPE (Qwen's) writes each byte of a token as one character: this maps them back
        byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else None

    @classmethod
    def from_folder(cls, folder: str, image_min_pixels: int, image_max_pixels: int) -> PromptBuilder:
        return cls(AutoProcessor.from_pretrained(folder), image_min_pixels, image_max_pixels)

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    def control_token_in(self, text: str) -> str | None:
        """The first of the tokenizer's special tokens (`<|im_start|>`, `<|image_pad|>`, ...) that `text` contains:
        the tokenizer would read it as that token, so a user could forge turns or image slots."""
        found = self._control_tokens.search(text) if self._control_tokens else None
        return found.group() if found else None

    def build(self, turns: list[ChatTurn], add_generation_prompt: bool = True) -> PromptInputs:
        messages = [{"role": turn.role, "content": _template_content(turn.parts)} for turn in turns]
        text = self._processor.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
        images = [part for turn in turns for part in turn.parts if isinstance(part, Image.Image)]
        if not images:
            encoded = self._processor(text=[text], return_tensors="pt")
            return PromptInputs(input_ids=encoded["input_ids"])
        encoded = self._processor(text=[text], images=images, return_tensors="pt", **self._image_kwargs)
        prompt = PromptInputs(
            input_ids=encoded["input_ids"],
            mm_token_type_ids=encoded["mm_token_type_ids"],
            pixel_values=encoded["pixel_values"],
            image_grid_thw=encoded["image_grid_thw"],
            image_token_id=self._processor.image_token_id,
        )
        return replace(prompt, image_hashes=_image_hashes(prompt))

    @staticmethod
    def from_token_ids(token_ids: list[int]) -> PromptInputs:
        """A raw prompt (a text completion's): the tokens as they are, no template, no images."""
        return PromptInputs(input_ids=torch.tensor([token_ids], dtype=torch.long))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain text (not a conversation) → token ids, as the tokenizer reads it."""
        return self._processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self._processor.tokenizer.decode(token_ids)

    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """One token as text (part of a character decodes to U+FFFD) and its exact bytes (a character's parts
        join up), as OpenAI's logprobs give them; cached, as logprobs name up to 21 tokens for each generated."""
        piece = self._token_pieces.get(token_id)
        if piece is None:
            tokenizer = self._processor.tokenizer
            text = tokenizer.decode([token_id])
            raw = tokenizer.convert_ids_to_tokens(token_id) or ""
            if self._byte_of is not None and all(char in self._byte_of for char in raw):
                data = [self._byte_of[char] for char in raw]
            else:
                data = list(text.encode("utf-8"))
            piece = self._token_pieces[token_id] = (text, data)
        return piece

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self._processor.tokenizer.convert_ids_to_tokens(token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self._processor.tokenizer)

    def planning_prompt(self, tokens: int) -> PromptInputs:
        """The heaviest prefill of exactly `tokens` tokens: as many largest-size images as fit, then filler text.
        Memory planning runs it, so the vision tower's activations are part of the measured peak (one prefill
        step may hold that many image tokens, from however many requests)."""
        side = int(self._image_kwargs["max_pixels"] ** 0.5)
        largest = Image.new("RGB", (side, side), (200, 120, 120))

        def with_images(count: int) -> PromptInputs:
            return self.build([ChatTurn("user", (largest,) * count)])

        one = with_images(1).num_tokens
        per_image = with_images(2).num_tokens - one
        count = (tokens - (one - per_image)) // per_image
        if count < 1:
            return PromptInputs(input_ids=torch.zeros(1, tokens, dtype=torch.long))
        prompt = with_images(count)
        # told apart, as different photos would be: each goes through the vision tower
        prompt = replace(prompt, image_hashes=tuple(f"planning-{image}" for image in range(count)))
        return prompt.followed_by([0] * (tokens - prompt.num_tokens))


def _image_hashes(prompt: PromptInputs) -> tuple[str, ...]:
    """The content hash of each image as the vision tower sees it (its resized, normalised patches and their grid):
    the same photo sent again finds its cached encoding and KV blocks; any other photo cannot."""
    hashes, start = [], 0
    for image, patches in enumerate(prompt.image_patches()):
        digest = hashlib.sha256(prompt.image_grid_thw[image].numpy().tobytes())
        digest.update(prompt.pixel_values[start : start + patches].contiguous().view(torch.uint8).numpy())
        hashes.append(digest.hexdigest())
        start += patches
    return tuple(hashes)


def _template_content(parts: tuple[Part, ...]) -> str | list[dict]:
    if all(isinstance(part, str) for part in parts):
        return "".join(parts)
    return [{"type": "image"} if isinstance(part, Image.Image) else {"type": "text", "text": part} for part in parts]
