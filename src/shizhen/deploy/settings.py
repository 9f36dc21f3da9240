"""Deployment settings (`SHIZHEN_DEPLOY_*`), separate from the server's: they describe the pod, not the model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DeploySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHIZHEN_DEPLOY_", env_file=".env", extra="ignore")

    pod_name: str = "shizhen"
    gpu_type: str = Field("NVIDIA A100 80GB PCIe", description="'NVIDIA GeForce RTX 4090' suits the 7B model.")
    gpu_count: int = Field(1, ge=1)
    # RunPod's PyTorch template image, pinned: CUDA 12.4 drivers are on every A100/4090 host
    image: str = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
    cloud_type: Literal["SECURE", "COMMUNITY", "ALL"] = Field("SECURE", description="Network volumes need SECURE.")
    container_disk_gb: int = Field(50, ge=10)
    volume_name: str = "shizhen-models"
    volume_gb: int = Field(100, ge=10, description="The 32B checkpoint is 67 GB; 100 GB leaves room.")
    data_center: str | None = Field(None, description="e.g. EU-RO-1; needed to create the volume.")
    port: int = 8000
    package: str = Field(
        "shizhen-serve", description="pip requirement the pod installs (a version, a wheel URL or a git URL)."
    )
    proxy_url: str = Field("https://{pod_id}-{port}.proxy.runpod.net", description="The pod's public address.")
    ready_timeout_seconds: float = Field(2400, gt=0, description="First start downloads 67 GB.")
    poll_seconds: float = Field(10, gt=0)
    # prices used when the API gives none
    gpu_price_per_hour: float = Field(1.64, ge=0)
    storage_price_per_gb_month: float = Field(0.07, ge=0)
