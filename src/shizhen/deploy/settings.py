"""Deployment settings (`SHIZHEN_DEPLOY_*`), separate from the server's: they describe the pod, not the model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..config import split_csv

# torch 2.14.1 from PyPI (requirements.txt) is built for CUDA 13.0: it needs a host whose driver runs CUDA 13
# (R580+). RunPod places the pod only on such hosts when the pod asks for these versions.
POD_CUDA_VERSIONS = ["13.0"]
# what `deploy up` and start_pod.sh pass to each other in the pod's env (not server settings)
POD_VARIABLES = frozenset({"SHIZHEN_PACKAGE", "SHIZHEN_REQUIREMENTS_B64", "SHIZHEN_MAX_RESTARTS", "SHIZHEN_PIP",
                           "SHIZHEN_SERVE_CMD", "SHIZHEN_RESTART_DELAY", "SHIZHEN_STOP_WAIT_SECONDS",
                           "SHIZHEN_STOP_POD_ON_FAILURE"})


class DeploySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHIZHEN_DEPLOY_", env_file=".env", extra="ignore")

    pod_name: str = Field("shizhen", description="The pod `deploy` creates and finds by this name.")
    gpu_type: str = Field("NVIDIA A100 80GB PCIe", description="'NVIDIA GeForce RTX 4090' suits the 7B model.")
    gpu_count: int = Field(1, ge=1, description="GPUs of the pod.")
    # RunPod's PyTorch image, pinned, for its Python 3.11, sshd and git; torch itself comes from requirements.txt
    # into a venv on the volume, with its own CUDA libraries, so only the host's driver matters (POD_CUDA_VERSIONS)
    image: str = Field("runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04", description="Container image.")
    cuda_versions: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(POD_CUDA_VERSIONS),
        description="allowedCudaVersions: host drivers that run the pinned torch wheels (comma-separated).")
    cloud_type: Literal["SECURE", "COMMUNITY", "ALL"] = Field("SECURE", description="Network volumes need SECURE.")
    container_disk_gb: int = Field(50, ge=10, description="Temporary disk, billed while running.")
    volume_name: str = Field("shizhen-models", description="The network volume at /workspace.")
    volume_gb: int = Field(100, ge=10, description="The 32B checkpoint is 67 GB; 100 GB leaves room.")
    data_center: str | None = Field(None, description="e.g. EU-RO-1; needed to create the volume.")
    port: int = Field(8000, description="The server's port, exposed over RunPod's HTTPS proxy.")
    # --- what the pod runs: this checkout, as a wheel on the volume (S3 API) or a pushed commit of a git remote
    git_url: str | None = Field(
        None, description="Instead of uploading a wheel: the pod installs git+URL@<this checkout's commit>.")
    s3_access_key_id: str | None = Field(None, description="RunPod S3 API key's access key (user_...).")
    s3_secret_access_key: SecretStr | None = Field(None, description="RunPod S3 API key's secret (rps_...).")
    s3_endpoint_url: str = Field(
        "https://s3api-{data_center}.runpod.io/", description="{data_center} is the volume's, in lower case.")
    # --- cost guards, sent to the pod unless SHIZHEN_IDLE_STOP_SECONDS / SHIZHEN_MAX_UPTIME_HOURS say otherwise
    idle_stop_seconds: float = Field(3600, ge=0, description="Default idle auto-stop of a deployed pod; 0: off.")
    max_uptime_hours: float = Field(12, ge=0, description="Default uptime cap of a deployed pod; 0: off.")
    max_restarts: int = Field(5, ge=1, description="Crashes in a row after which the pod stops itself.")
    # --- serverless (`deploy up --serverless`): a load-balancing endpoint that scales to zero, on the same volume
    endpoint_name: str = Field("shizhen", description="The serverless endpoint; its template is NAME-worker.")
    serverless_gpu_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["AMPERE_80", "ADA_80_PRO"],
        description="GPU pools in order of preference: A100 80GB first, then the other 80 GB types.")
    workers_min: int = Field(0, ge=0, description="Workers kept running; 0 scales to zero when nobody asks.")
    workers_max: int = Field(2, ge=1, description="Workers at most, under load.")
    idle_timeout_seconds: int = Field(
        600, ge=5, description="A worker with no request for this long stops (a cold start loads 67 GB again).")
    requests_per_worker: int = Field(
        32, ge=1, description="Concurrent requests per worker before RunPod starts another (REQUEST_COUNT scaler).")
    serverless_url: str = Field("https://{endpoint_id}.api.runpod.ai", description="The endpoint's public address.")
    serverless_price_per_second: float = Field(
        0.00076, ge=0, description="$/s of one 80 GB flex worker (RunPod's price list; set yours) for `cost`.")
    cold_start_seconds: float = Field(
        240, gt=0, description="Worker start to first answer, 32B from the volume (for `cost`; measure yours).")
    answer_seconds: float = Field(30, gt=0, description="Worker time of one consultation's answer (for `cost`).")
    proxy_url: str = Field("https://{pod_id}-{port}.proxy.runpod.net", description="The pod's public address.")
    ready_timeout_seconds: float = Field(2400, gt=0, description="First start downloads 67 GB.")
    poll_seconds: float = Field(10, gt=0, description="How often `up` asks /health.")
    # prices used when the API gives none
    gpu_price_per_hour: float = Field(1.64, ge=0, description="$/h of one GPU when the API gives none.")
    storage_price_per_gb_month: float = Field(0.07, ge=0, description="Network volume, running or not.")
    container_disk_price_per_gb_month: float = Field(0.10, ge=0, description="Container disk, only while running.")

    @field_validator("cuda_versions", "serverless_gpu_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return split_csv(value)
