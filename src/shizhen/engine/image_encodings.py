"""The vision tower's outputs, kept on the device by image content hash: a photo sent again with the next turn of
a consultation skips the tower, and a prompt prefilled in chunks encodes each of its images once, whichever chunks
its tokens fall in. Least recently used entries go first once the entries pass `capacity_tokens`."""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageEncodings:
    def __init__(self, capacity_tokens: int):
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # hash → [image tokens, hidden]
        self._tokens = 0
        self.hits = 0  # lookups that found the image, since start
        self.misses = 0

    def get(self, image_hash: str) -> torch.Tensor | None:
        found = self._entries.get(image_hash)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(image_hash)
        return found

    def put(self, image_hash: str, encoding: torch.Tensor) -> None:
        if image_hash in self._entries or len(encoding) > self.capacity_tokens:
            return
        while self._tokens + len(encoding) > self.capacity_tokens:
            _, oldest = self._entries.popitem(last=False)
            self._tokens -= len(oldest)
        self._entries[image_hash] = encoding
        self._tokens += len(encoding)
