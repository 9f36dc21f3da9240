"""Loads the checkpoint through the real path: AutoProcessor + Qwen2_5_VLForConditionalGeneration.from_pretrained."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

from .. import load_phase
from ..load_phase import LoadPhase

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_SIZED_CHECKPOINT_BYTES = 8 * 10**9  # above this, a CPU load takes many minutes and answers at seconds a token


class NoUsableGpu(RuntimeError):
    """A GPU was expected (a pod, or a big checkpoint) and torch sees none: refuse rather than crawl on the CPU."""


def require_gpu_if_expected(source: str, required: bool | None) -> None:
    """`required` None means: on a RunPod pod, for a hub id (ShizhenGPT's checkpoints are 16-67 GB), or for a
    local checkpoint over CPU_SIZED_CHECKPOINT_BYTES."""
    if torch.cuda.is_available():
        return
    if required is None:
        folder = Path(source)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else None
        required = bool(os.environ.get("RUNPOD_POD_ID")) or size is None or size > CPU_SIZED_CHECKPOINT_BYTES
    if required:
        raise NoUsableGpu(
            f"no usable GPU: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees none, so {source} "
            "would load on the CPU in float32. Check the driver (nvidia-smi) runs this CUDA version, or set "
            "SHIZHEN_REQUIRE_GPU=false to load on the CPU anyway.")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 (Qwen2.5's training dtype) where the GPU supports it, else fp16; fp32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class LoadedModel:
    model: Qwen2_5_VLForConditionalGeneration
    processor: object
    dtype: torch.dtype
    stop_token_ids: frozenset[int]
    sampling_defaults: dict[str, float]
    folder: str  # where it was loaded from: the API process loads the same processor from here

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    device_map: str = "auto",
    max_memory: dict[str, str] | None = None,
    report_phase: Callable[[LoadPhase], None] = lambda phase: None,
) -> LoadedModel:
    torch_dtype = resolve_dtype(dtype)
    if not torch.cuda.is_available():
        device_map, max_memory = "cpu", None  # a GPU map or memory cap means nothing without a GPU
    max_memory = {int(k) if k.isdigit() else k: v for k, v in (max_memory or {}).items()} or None
    report_phase(LoadPhase(load_phase.LOADING_PROCESSOR, f"loading processor from {source}"))
    processor = AutoProcessor.from_pretrained(source)
    report_phase(LoadPhase(load_phase.LOADING_WEIGHTS,
                           f"loading weights from {source} ({torch_dtype}, device_map={device_map})"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        source, dtype=torch_dtype, device_map=device_map, max_memory=max_memory
    )
    model.eval()
    config = model.generation_config
    return LoadedModel(model, processor, torch_dtype, _stop_token_ids(config, processor), _sampling_defaults(config),
                       source)


def _stop_token_ids(generation_config: GenerationConfig, processor) -> frozenset[int]:
    """The checkpoint's end-of-turn tokens: generation_config's eos ids plus the tokenizer's eos."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if processor.tokenizer.eos_token_id is not None:
        ids.add(processor.tokenizer.eos_token_id)
    return frozenset(ids)


def _sampling_defaults(generation_config: GenerationConfig) -> dict[str, float]:
    """The checkpoint's recommended sampling settings, used where a request leaves one out (as vLLM does)."""
    if not generation_config.do_sample:
        return {}
    names = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {name: value for name in names if (value := getattr(generation_config, name, None)) is not None}
