"""Where a model load stands, as `/health` reports it: a stable step code a page can translate, the English detail
for logs and operators, and, while downloading, the bytes behind a progress bar and an ETA."""

from __future__ import annotations

from typing import NamedTuple

# the steps, in the order a start-up goes through them
STARTING = "starting"
READING_METADATA = "reading_metadata"
DOWNLOADING = "downloading"
LOADING_PROCESSOR = "loading_processor"
LOADING_WEIGHTS = "loading_weights"
PLANNING_MEMORY = "planning_memory"
ALLOCATING_CACHE = "allocating_cache"
CAPTURING_GRAPHS = "capturing_graphs"
PREPARING_GRAMMARS = "preparing_grammars"
RESTARTING = "restarting"
READY = "ready"


class LoadPhase(NamedTuple):
    step: str
    detail: str
    download: dict | None = None  # file, done_bytes, total_bytes, bytes_per_s, eta_s (None until a rate is known)

    def health(self) -> dict:
        """The fields `/health` adds while the model loads."""
        body = {"phase": self.detail, "step": self.step}
        return body | {"download": self.download} if self.download else body
