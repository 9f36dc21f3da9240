"""The 32B-VL vision tower (random bf16 weights) on phone photos: transformers' window-by-window attention against
the engine's packed attention (`shizhen.engine.vision_attention`), and how far apart their outputs are.

Run on a GPU (the `device` tool): `python vision_tower.py [--photos 1 10] [--json PATH]`. 10 photos of the largest
size are about what one prefill step (8,192 tokens) holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import emit, write_json
from engine_throughput import TEXT_32B, VISION_32B, sync
from PIL import Image
from transformers import (
    AttentionInterface,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from shizhen.config import Settings
from shizhen.engine.vision_attention import NAME, packed_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test, in float32


def vision_tower(dtype: torch.dtype) -> torch.nn.Module:
    """The real vision tower; the text model around it shrunk to one layer and a small vocabulary."""
    config = Qwen2_5_VLConfig(text_config=TEXT_32B | {"num_hidden_layers": 1, "vocab_size": 1024},
                              vision_config=VISION_32B)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.model.visual.eval()


def seconds(visual: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor, repeats: int
            ) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = visual(pixels, grid_thw=grid).pooler_output  # warm-up
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            out = visual(pixels, grid_thw=grid).pooler_output
        sync()
    return (time.perf_counter() - started) / repeats, out


def profile(visual: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> None:
    """Where one pass's time goes, by operator (GPU and host time), printed to stderr."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                           if DEVICE.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler, torch.inference_mode():
        visual(pixels, grid_thw=grid)
        sync()
    sort = "cuda_time_total" if DEVICE.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, nargs="*", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one packed pass")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    settings = Settings()
    processor = Qwen2VLImageProcessor(min_pixels=settings.image_min_pixels, max_pixels=settings.image_max_pixels)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    visual = vision_tower(dtype)
    AttentionInterface.register(NAME, packed_attention)
    for count in args.photos:
        photos = [Image.effect_noise((1536, 1152), 50).convert("RGB") for _ in range(count)]
        encoded = processor(images=photos, return_tensors="pt")
        pixels = encoded["pixel_values"].to(DEVICE, dtype)
        grid = encoded["image_grid_thw"].to(DEVICE)
        timings = {}
        for implementation in ("sdpa", NAME):
            visual.config._attn_implementation = implementation
            timings[implementation] = seconds(visual, pixels, grid, args.repeats)
        (stock_s, stock), (packed_s, packed) = timings["sdpa"], timings[NAME]
        device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        emit(rows, {"bench": "vision_tower", "device": device, "photos": count,
                    "photo": "1536x1152", "patches": int(pixels.shape[0]), "image_tokens": int(stock.shape[0]),
                    "per_window_ms": round(stock_s * 1e3, 1), "packed_ms": round(packed_s * 1e3, 1),
                    "speedup": round(stock_s / packed_s, 2),
                    "max_abs_difference": float((stock.float() - packed.float()).abs().max()),
                    "output_abs_mean": float(stock.float().abs().mean())})
        if args.profile:
            profile(visual, pixels, grid)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
