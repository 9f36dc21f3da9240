"""The model store: download the checkpoint once into the persistent cache, verify it, repair it, start offline.

A download records a manifest beside the hub cache (commit, and each file's size and LFS SHA-256 as the hub
reported them). Start-up with a manifest whose files pass the fast check (present, right size, safetensors headers
that parse, every shard of the index there) touches no network at all. A file that fails is named, removed and
fetched once more; if it is still wrong, start-up stops with the reason instead of loading garbage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import random
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm.auto import tqdm

from . import load_phase
from .load_phase import LoadPhase

log = logging.getLogger(__name__)
RANDOM_MODEL_MARKER = "SHIZHEN_TINY_RANDOM_MODEL"  # a file in the folder: the server labels such a model random

# Only what the server loads: config, tokenizer and processor files, chat template, safetensors weights.
NEEDED_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")
GIB = 1024**3


class StoreError(RuntimeError):
    """The checkpoint cannot be made ready; the message says which file and why."""


@dataclass(frozen=True)
class FileProblem:
    name: str
    reason: str


@dataclass
class DownloadProgress:
    """Bytes fetched so far of the files being downloaded, for `/health`, the page's progress bar and the log."""

    total_bytes: int = 0
    done_bytes: int = 0
    current_file: str | None = None
    started: float = field(default_factory=time.monotonic)

    def phase(self) -> LoadPhase:
        share = self.done_bytes / self.total_bytes * 100 if self.total_bytes else 0
        detail = (f"downloading {self.current_file}: {self.done_bytes / GIB:.2f} of {self.total_bytes / GIB:.2f} GiB "
                  f"({share:.0f}%)")
        elapsed = time.monotonic() - self.started
        rate = self.done_bytes / elapsed if self.done_bytes and elapsed > 0 else None
        eta = round(max(self.total_bytes - self.done_bytes, 0) / rate, 1) if rate else None
        return LoadPhase(load_phase.DOWNLOADING, detail, {
            "file": self.current_file, "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
            "bytes_per_s": round(rate) if rate else None, "eta_s": eta})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_seconds: float = 1.0  # doubled each attempt, with jitter
    max_seconds: float = 60.0


class ModelStore:
    def __init__(self, repo_id: str, cache_dir: Path, *, endpoint: str | None = None, token: str | None = None,
                 revision: str = "main", retry: RetryPolicy = RetryPolicy(),
                 report: Callable[[LoadPhase], None] = lambda phase: None):
        self.repo_id = repo_id
        self.cache_dir = Path(cache_dir)
        self._endpoint = endpoint
        self._token = token  # never logged
        self._revision = revision
        self._retry = retry
        self._report = report
        self.progress = DownloadProgress()

    @property
    def manifest_path(self) -> Path:
        return self.cache_dir / "shizhen-manifests" / f"{self.repo_id.replace('/', '--')}.json"

    # --- the start path ------------------------------------------------------------------------------------------
    def ensure(self) -> Path:
        """A verified local snapshot folder, downloading or repairing only what is missing or wrong."""
        manifest = self._read_manifest()
        if manifest is None:
            manifest = self.download()
        problems = self.verify(manifest)
        if problems:
            self._repair(manifest, problems)
            if problems := self.verify(manifest):
                raise StoreError("the cached checkpoint is still wrong after a repair: " + _describe(problems))
        return self.snapshot_dir(manifest)

    def snapshot_dir(self, manifest: dict) -> Path:
        return self.cache_dir / f"models--{self.repo_id.replace('/', '--')}" / "snapshots" / manifest["commit"]

    # --- downloading ---------------------------------------------------------------------------------------------
    def download(self) -> dict:
        """Fetch every needed file (resuming partial ones) and record the manifest."""
        self._report(LoadPhase(load_phase.READING_METADATA, f"reading {self.repo_id} metadata from the hub"))
        api = HfApi(endpoint=self._endpoint, token=self._token)
        info = self._with_retries(lambda: api.model_info(self.repo_id, revision=self._revision, files_metadata=True),
                                  "the repository metadata")
        files = {s.rfilename: {"size": s.size, "sha256": s.lfs.sha256 if s.lfs else None}
                 for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in NEEDED_FILES)}
        manifest = {"repo_id": self.repo_id, "commit": info.sha, "files": files}
        self._check_free_disk(manifest)
        self.progress = DownloadProgress(total_bytes=sum(f["size"] or 0 for f in files.values()))
        for name in files:
            self._fetch(manifest, name)
        self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
        self.manifest_path.write_text(json.dumps(manifest, indent=1))
        return manifest

    def _fetch(self, manifest: dict, name: str, force: bool = False) -> None:
        self.progress.current_file = name
        self._report(self.progress.phase())
        progress = self.progress

        report = self._report

        class Progress(tqdm):  # counts bytes for /health while drawing the usual bar on a terminal
            def update(self, n=1):
                progress.done_bytes += n or 0
                report(progress.phase())
                return super().update(n)

        self._with_retries(lambda: hf_hub_download(
            self.repo_id, name, revision=manifest["commit"], cache_dir=self.cache_dir, endpoint=self._endpoint,
            token=self._token, force_download=force, tqdm_class=Progress), name)

    def _with_retries(self, action, what: str):
        """Retry connection errors, timeouts, 429 and 5xx with exponential backoff and jitter; others fail at once."""
        policy = self._retry
        for attempt in range(1, policy.attempts + 1):
            try:
                return action()
            except (httpx.TransportError, HfHubHTTPError, LocalEntryNotFoundError) as exc:
                cause = _network_cause(exc)
                status = getattr(getattr(cause, "response", None), "status_code", None)
                retryable = isinstance(cause, httpx.TransportError) or status == 429 or (status or 0) >= 500
                if not retryable or attempt == policy.attempts:
                    raise StoreError(f"could not download {what} from {self.repo_id} after {attempt} attempt(s): "
                                     f"{type(exc).__name__}: {_first_line(exc)}") from exc
                delay = min(policy.max_seconds, policy.base_seconds * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("downloading %s failed (%s); retry %d of %d in %.1f s", what, _first_line(exc),
                            attempt, policy.attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _check_free_disk(self, manifest: dict) -> None:
        needed = sum(f["size"] or 0 for f in manifest["files"].values())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free
        if needed > free:
            raise StoreError(f"not enough disk space in {self.cache_dir}: the checkpoint needs {needed / GIB:.1f} GiB "
                             f"({needed} bytes), {free / GIB:.1f} GiB ({free} bytes) is free")

    # --- verifying and repairing ---------------------------------------------------------------------------------
    def verify(self, manifest: dict, full: bool = False) -> list[FileProblem]:
        """Fast: every file present with its recorded size, safetensors headers parse, the index's shards listed.
        Full: also each LFS file's SHA-256 against the hub's."""
        folder = self.snapshot_dir(manifest)
        problems = []
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.exists():
                problems.append(FileProblem(name, "missing"))
            elif expected["size"] is not None and path.stat().st_size != expected["size"]:
                problems.append(FileProblem(name, f"{path.stat().st_size} bytes, expected {expected['size']}"))
            elif name.endswith(".safetensors") and (reason := _safetensors_header_problem(path)):
                problems.append(FileProblem(name, reason))
            elif full and expected["sha256"] and _sha256(path) != expected["sha256"]:
                problems.append(FileProblem(name, "SHA-256 differs from the hub's"))
        index = folder / "model.safetensors.index.json"
        if index.exists():
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                if shard not in manifest["files"]:
                    problems.append(FileProblem(shard, "named in the index but not in the download"))
        return problems

    def repair(self, full: bool = False) -> list[FileProblem]:
        """Verify and re-fetch what is wrong, once; returns the problems found (empty: all was well)."""
        manifest = self._read_manifest()
        if manifest is None:
            raise StoreError(f"{self.repo_id} has not been downloaded to {self.cache_dir}; run `shizhen download`")
        problems = self.verify(manifest, full)
        if problems:
            self._repair(manifest, problems)
            if remaining := self.verify(manifest, full):
                raise StoreError("still wrong after a repair: " + _describe(remaining))
        return problems

    def _repair(self, manifest: dict, problems: list[FileProblem]) -> None:
        log.warning("repairing the cached checkpoint: %s", _describe(problems))
        self.progress = DownloadProgress(total_bytes=sum(manifest["files"].get(p.name, {}).get("size") or 0
                                                         for p in problems))
        for problem in problems:
            path = self.snapshot_dir(manifest) / problem.name
            if path.is_symlink():
                path.resolve().unlink(missing_ok=True)  # the blob the link points to
            path.unlink(missing_ok=True)
            self._fetch(manifest, problem.name, force=True)

    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())


def is_random_test_model(model_source: str) -> bool:
    return (Path(model_source) / RANDOM_MODEL_MARKER).exists()


def model_folder(source: str) -> Path | None:
    """The local checkpoint folder `source` names, or None for a hub id ("org/name"). Something that looks like a
    path and is no folder is an error here, not a hub id to try five times."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") != 1:
        raise StoreError(f"no such folder: {source} (a local checkpoint folder, or a hub id like "
                         "FreedomIntelligence/ShizhenGPT-7B-VL)")
    return None


def _safetensors_header_problem(path: Path) -> str | None:
    """A safetensors file starts with an 8-byte length and a JSON header whose offsets must fit the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "too short for a safetensors header"
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            return "safetensors header longer than the file"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "safetensors header is not valid JSON"
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + data_end > size:
        return "safetensors data runs past the end of the file"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(problems: list[FileProblem]) -> str:
    return "; ".join(f"{p.name}: {p.reason}" for p in problems)


def _network_cause(exc: BaseException) -> BaseException:
    """huggingface_hub wraps network failures (e.g. in LocalEntryNotFoundError); find the HTTP-level one."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (httpx.TransportError, HfHubHTTPError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def model_store(settings, report: Callable[[LoadPhase], None] = lambda phase: None) -> ModelStore:
    """The store for the configured model, cache, hub and token."""
    from huggingface_hub import constants

    return ModelStore(
        settings.model,
        settings.hub_cache_dir or Path(constants.HF_HUB_CACHE),
        endpoint=settings.hf_endpoint,
        token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        retry=RetryPolicy(attempts=settings.download_attempts, base_seconds=settings.download_backoff_seconds),
        report=report,
    )
