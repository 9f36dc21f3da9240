"""Batch-1 projections of the 32B model: the engine's Triton GEMV (kernels.linear) against cuBLAS (F.linear).

Run on a GPU (the `device` tool): `python bench/gemv.py`. Each weight shape is timed over enough copies that the
L2 cache never holds it (a CUDA graph of one product per copy), and reported as TB/s of weights read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import emit, replay_ms, write_json
from torch.nn import functional as F

from shizhen.engine import kernels

SHAPES_32B = {"qkv": (7168, 5120), "o_proj": (5120, 5120), "gate_up": (55296, 5120), "down": (5120, 27648),
              "lm_head": (152064, 5120)}


def microseconds_per_product(product, weights: list[torch.Tensor]) -> float:
    product(weights[0])  # compiles the Triton kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weight in weights:
            product(weight)
    return replay_ms(graph, repeats=10) * 1e3 / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    emit(rows, {"bench": "setup", "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    for name, (out_features, in_features) in SHAPES_32B.items():
        size = out_features * in_features * 2
        weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / 64
                   for _ in range(max(2, -(-600_000_000 // size)))]
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(kernels.linear(x, weights[0]), F.linear(x, weights[0]), atol=2e-2, rtol=2e-2)
        cublas = microseconds_per_product(lambda w: F.linear(x, w), weights)
        triton = microseconds_per_product(lambda w: kernels.linear(x, w), weights)
        emit(rows, {"bench": "gemv", "shape": name, "weight_mb": round(size / 1e6), "cublas_us": round(cublas, 1),
                    "cublas_tb_per_s": round(size / cublas / 1e6, 2), "triton_us": round(triton, 1),
                    "triton_tb_per_s": round(size / triton / 1e6, 2)})
        del weights
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
