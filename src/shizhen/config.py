"""The one settings object: environment variables prefixed `SHIZHEN_` (or a `.env` file), overridden by CLI flags.

Every limit, default and path the server uses is read from here; `.env.example` documents each one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "FreedomIntelligence/ShizhenGPT-32B-VL"
DEMO_MODEL_NAME = "shizhen-demo-tiny-random"
_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def split_csv(value: object) -> object:
    """Accept `a,b,c` or a JSON list `["a", "b"]` from an environment variable, as well as a list from Python."""
    if isinstance(value, str):
        if value.strip().startswith("["):
            return json.loads(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SHIZHEN_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    # --- the model --------------------------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, description="Hub id or local folder of the checkpoint.")
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; defaults to the model id (or the demo's name)."
    )
    demo: bool = Field(
        False, description="Serve a tiny random-weight checkpoint built offline (no GPU, no download)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="`auto`: bfloat16 where the GPU supports it, else float16; float32 on CPU."
    )
    require_gpu: bool | None = Field(
        None, description="Refuse to load without a usable GPU. Default (unset): on a RunPod pod, for hub ids and "
                          "for checkpoints over 8 GB; --no-require-gpu lets a big model load on the CPU (slowly)."
    )
    device_map: str = Field("auto", description="Passed to from_pretrained: `auto`, `cuda:0`, `cpu`, ...")
    max_memory: Annotated[dict[str, str] | None, NoDecode] = Field(
        None,
        description="Per-device memory cap for from_pretrained: 0=75GiB (or JSON {\"0\": \"75GiB\"}) on an 80 GB card.",
    )
    cache_dir: Path | None = Field(
        None,
        validation_alias=AliasChoices("cache_dir", "SHIZHEN_CACHE_DIR", "HF_HOME"),
        description="Model cache (HF_HOME); /workspace/models on a RunPod pod.",
    )

    # --- the engine ---------------------------------------------------------------------------------------------
    max_num_seqs: int = Field(64, ge=1, description="Sequences decoded together at most (fewer if memory is short).")
    gpu_memory_utilization: float = Field(
        0.92, gt=0.1, le=0.99, description="Share of GPU memory for weights, activations and the KV cache."
    )
    enforce_eager: bool = Field(False, description="No CUDA graphs (slow; for debugging).")
    kv_cache_tokens: int | None = Field(
        None, ge=64, description="Cap the KV cache at this many tokens (default: all that memory planning leaves).")
    prefill_token_budget: int = Field(
        2048, ge=16, description="Prompt tokens prefilled per engine step, between two decode steps; longer prompts "
                                 "are prefilled in chunks, so running streams wait at most one chunk per token.")
    enable_prefix_caching: bool = Field(
        True, description="Keep full KV blocks after their request, for later prompts with the same beginning "
                          "(a conversation's next turn, its photo, a shared system prompt).")
    image_cache_tokens: int = Field(
        16384, ge=0, description="Vision-tower outputs kept on the GPU (in image tokens; a 448x448 photo is 256) so "
                                 "a photo sent again skips the tower; taken from the KV cache's memory.")
    engine_max_restarts: int = Field(
        3, ge=0, description="Engine processes that may die in a row (a CUDA fault, killed) and be replaced before "
                             "the engine counts as failed; one that served 10 minutes resets the count.")

    # --- the model store (hub downloads) ---------------------------------------------------------------------------
    hf_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("hf_endpoint", "SHIZHEN_HF_ENDPOINT", "HF_ENDPOINT"),
        description="The hub's address (HF_ENDPOINT); default https://huggingface.co.",
    )
    hf_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("hf_token", "SHIZHEN_HF_TOKEN", "HF_TOKEN"),
        description="Hub token for gated or private checkpoints (HF_TOKEN); never printed.",
    )
    download_attempts: int = Field(5, ge=1, description="Tries per file on connection errors, 429 and 5xx.")
    download_backoff_seconds: float = Field(2.0, ge=0, description="First retry delay; doubled each time.")

    # --- HTTP ---------------------------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on; 127.0.0.1 keeps it to this machine.")
    port: int = Field(
        8000, ge=1, le=65535, validation_alias=AliasChoices("port", "SHIZHEN_PORT", "PORT"),
        description="Port to listen on, bound before the model loads (PORT: RunPod's serverless worker contract).")
    health_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=AliasChoices("health_port", "SHIZHEN_HEALTH_PORT", "PORT_HEALTH"),
        description="A second port answering too, for /ping (PORT_HEALTH: what RunPod's load balancer polls).")
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="Comma-separated origins; `*` allows any."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys; empty means no authentication."
    )
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    stream_heartbeat_seconds: float = Field(
        15.0, gt=0, description="SSE comment sent while waiting for tokens, so idle-timeout proxies keep the stream."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    log_json: bool | None = Field(None, description="JSON log lines; default: when stderr is not a terminal.")
    log_message_contents: bool = Field(False, description="Debug only: also log what clients send.")
    metrics_require_api_key: bool = Field(False, description="Guard /metrics with the API keys too.")

    # --- protection -----------------------------------------------------------------------------------------------
    max_waiting_requests: int = Field(
        256, ge=1, description="Accepted requests not yet generating beyond this get 429 (preparing ones count).")
    prompt_build_threads: int = Field(
        2, ge=1, description="Threads that apply the chat template and tokenize (they hold the GIL: keep it small).")
    request_timeout_seconds: float = Field(600.0, gt=0, description="A generation running longer is ended (504).")
    rate_limit: str | None = Field(
        None, description="Per API key (or client address), in the `limits` syntax: '60/minute', '10/second;500/hour'."
    )
    rate_limit_storage_url: str = Field(
        "memory://", description="memory:// (this process) or redis://host:6379 (shared by replicas)."
    )
    idle_stop_seconds: float | None = Field(
        None, ge=0, description="On a RunPod pod: stop the pod after this long without requests (never mid-request); "
                                "0: off (`deploy up` sends 3600 unless set)."
    )
    max_uptime_hours: float | None = Field(
        None, ge=0, description="On a RunPod pod: stop it after this long, always; 0: off (`deploy up` sends 12).")
    idle_check_seconds: float = Field(30.0, gt=0, description="How often the auto-stop looks.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM: how long running generations may finish before the server exits."
    )
    stay_up_on_load_failure: bool = Field(
        False, description="When the model cannot load: keep serving /health's `failed` and its reason instead of "
                           "exiting with code 1 (a supervisor then restarts it)."
    )

    # --- generation limits --------------------------------------------------------------------------------------
    default_max_tokens: int = Field(2048, ge=1, description="Used when a request sets no max_tokens.")
    max_tokens_limit: int = Field(8192, ge=1, description="Largest max_tokens a request may ask for.")
    max_context_length: int = Field(8192, ge=16, description="Prompt plus completion tokens, at most.")

    # --- images -------------------------------------------------------------------------------------------------
    max_images_per_request: int = Field(4, ge=0, description="Photos one request may carry.")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest encoded image accepted.")
    # A tongue photo needs the coating's texture, cracks and tooth marks, not the whole face: ~776x776 pixels
    # (768 visual tokens) keeps that detail while bounding prefill; tiny crops are upscaled to ~224x224.
    image_min_pixels: int = Field(64 * 28 * 28, ge=28 * 28, description="Images are upscaled to at least this.")
    image_max_pixels: int = Field(768 * 28 * 28, ge=28 * 28, description="Images are downscaled to at most this.")

    max_image_decoded_pixels: int = Field(
        64_000_000, ge=28 * 28, description="Larger images are refused before decoding (decompression bombs)."
    )
    image_decode_threads: int = Field(4, ge=1, description="Threads that decode and resize images.")
    image_fetch_enabled: bool = Field(True, description="Accept http(s) image URLs (fetched by the server).")
    image_fetch_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="If set, only these hosts (and subdomains) are fetched, and they may be private addresses.",
    )
    image_fetch_connect_timeout_seconds: float = Field(3.0, gt=0, description="Connecting to an image URL's host.")
    image_fetch_timeout_seconds: float = Field(10.0, gt=0, description="Whole fetch, redirects included.")
    image_fetch_max_redirects: int = Field(3, ge=0, description="Redirects followed, each checked like the first.")

    @property
    def listens_beyond_this_machine(self) -> bool:
        return self.host not in ("127.0.0.1", "localhost", "::1")

    @field_validator("cors_allowed_origins", "api_keys", "image_fetch_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return split_csv(value)

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory_map_text(cls, value: object) -> object:
        """`0=75GiB,cpu=100GiB` (quote-free, as pod environments need) or JSON."""
        if isinstance(value, str):
            if value.strip().startswith("{"):
                return json.loads(value)
            pairs = split_csv(value)
            if malformed := [item for item in pairs if "=" not in item]:
                raise ValueError(f"expected DEVICE=SIZE pairs, e.g. 0=75GiB or 0=75GiB,cpu=100GiB, not "
                                 f"{malformed[0]!r}")
            return dict(item.split("=", 1) for item in pairs) or None
        return value

    @field_validator("max_memory")
    @classmethod
    def _valid_memory_map(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for device, size in (value or {}).items():
            if not (device.isdigit() or device in {"cpu", "disk"} or device.startswith("cuda:")):
                raise ValueError(f"device {device!r} must be a GPU index, 'cuda:N', 'cpu' or 'disk'")
            if not _MEMORY_SIZE.match(size):
                raise ValueError(f"size {size!r} for device {device!r} must look like '75GiB' or '80GB'")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str | None) -> str | None:
        if value:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a rate like '60/minute': {exc}") from None
        return value or None

    @model_validator(mode="after")
    def _consistent_limits(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError("image_min_pixels must not exceed image_max_pixels")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.max_context_length:
            raise ValueError("kv_cache_tokens must hold one max_context_length sequence")
        return self

    @property
    def hub_cache_dir(self) -> Path | None:
        """Where hub downloads go: `$HF_HOME/hub`, the layout huggingface_hub itself uses."""
        return self.cache_dir / "hub" if self.cache_dir else None

    @property
    def model_name(self) -> str:
        """The name clients use in `model`."""
        if self.served_model_name:
            return self.served_model_name
        return DEMO_MODEL_NAME if self.demo else self.model


# `shizhen serve --help` groups its flags as the class above does: the first field of each group, and its title
SETTINGS_SECTIONS = {
    "model": "the model",
    "max_num_seqs": "the engine",
    "hf_endpoint": "the model store (hub downloads)",
    "host": "HTTP",
    "max_waiting_requests": "protection and cost control",
    "default_max_tokens": "generation limits",
    "max_images_per_request": "images",
}
