"""Where one decode step's GPU time goes, kernel by kernel, on the real 32B-VL widths (random bf16 weights).

Run on a GPU (the `device` tool): `python bench/decode_profile.py --layers 8 --batches 1 64`. For each batch it
profiles a few eager decode steps (the same kernels a captured graph replays), prints JSON lines with the kernels
that take the most time per step, the kernel count and total, and the graph replay time of the same step.
Per-layer kernels scale with `--layers`; the real model has 64. Then it runs the whole engine (1 and 64 concurrent
requests) under the profiler: how busy the GPU was over the decode phase, and the host calls that took the most time
(a GPU that waits on the host shows up here, not in the replay times).
"""

from __future__ import annotations

import argparse
import contextlib
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from common import emit, replay_ms, write_json
from engine_throughput import PROMPT_TOKENS, build, run_requests, start_engine, text_prompt
from torch.profiler import ProfilerActivity, profile

from shizhen.engine.core import EngineCore
from shizhen.engine.model_runner import ModelRunner

STEPS = 5


def kernel_times(runner: ModelRunner, batch: int, length: int) -> dict[str, tuple[float, int]]:
    """Kernel name → (µs per step, launches per step), from eager steps under the profiler."""
    for _ in range(2):
        runner._decode_step(batch, length)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            runner._decode_step(batch, length)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time / STEPS
            totals[event.name][1] += 1 / STEPS
    return {name: (us, round(count)) for name, (us, count) in totals.items()}


@contextlib.contextmanager
def host_syncs():
    """Counts the engine's synchronizing CUDA calls by call site (torch's sync debug mode warns at each one)."""
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "shizhen" in f.filename]
        sites[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in reversed(frames[-3:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(0)


def engine_loop(engine: EngineCore, args, rows: list[dict]) -> None:
    """GPU busy share, synchronizing calls and the heaviest host calls while the engine serves 1 and 64 streams."""
    for requests in (1, 64):
        prompts = [text_prompt(PROMPT_TOKENS, 7000 + i) for i in range(requests)]
        run_requests(engine, prompts, [16] * requests, [0] * requests)  # warm-up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            results = run_requests(engine, prompts, [128] * requests, [0] * requests)
        first = min(timeline.first for timeline in results)
        wall_us = (max(timeline.last for timeline in results) - first) * 1e6
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        emit(rows, {"bench": "engine_loop", "requests": requests, "tokens_each": 128,
                    "steps_per_s": round(127 / wall_us * 1e6, 1), "gpu_busy_share": round(gpu_us / wall_us, 3)})
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            emit(rows, {"bench": "host_call", "requests": requests, "name": event.key[:80], "calls": event.count,
                        "self_cpu_ms": round(event.self_cpu_time_total / 1e3, 1)})
        with host_syncs() as sites:
            run_requests(engine, prompts, [32] * requests, [0] * requests)
        for site, count in sites.most_common(6):
            emit(rows, {"bench": "host_sync", "requests": requests, "tokens_each": 32, "count": count, "site": site})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--cache-len", type=int, default=200, help="tokens already in every slot")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    parser.set_defaults(tiny=False, shape="32b", dtype=None, max_len=512, gpu_memory_utilization=0.95, eager=False)
    args = parser.parse_args()
    args.max_num_seqs = max(64, *args.batches)
    rows: list[dict] = []
    loaded, text_bytes = build(args)
    engine = start_engine(loaded, args)
    emit(rows, {"bench": "setup", "device": torch.cuda.get_device_name(), "layers": args.layers,
                "text_weights_gb": round(text_bytes / 1e9, 2), "torch": torch.__version__})
    decode_steps(engine._runner, text_bytes, args, rows)  # the engine is idle: its graphs are free to replay
    engine_loop(engine, args, rows)
    write_json(rows, args.json)


def decode_steps(runner: ModelRunner, text_bytes: int, args, rows: list[dict]) -> None:
    runner._inputs[1:].fill_(args.cache_len)
    length = next(size for size in runner.length_buckets if size > args.cache_len)
    for batch in args.batches:
        kernels = kernel_times(runner, batch, length)
        step_ms = replay_ms(runner._graphs[(batch, length)])
        total_us = sum(us for us, _ in kernels.values())
        emit(rows, {"bench": "decode_step", "batch": batch, "attended_length": length, "graph_replay_ms": round(
            step_ms, 3), "kernel_ms": round(total_us / 1e3, 3), "kernels": sum(n for _, n in kernels.values()),
            "weights_tb_per_s": round(text_bytes / step_ms / 1e9, 2)})
        for name, (us, count) in sorted(kernels.items(), key=lambda item: -item[1][0])[: args.top]:
            emit(rows, {"bench": "kernel", "batch": batch, "us_per_step": round(us, 1), "launches": count,
                        "share": round(us / total_us, 3), "name": name[:110]})
    runner._inputs.zero_()


if __name__ == "__main__":
    main()
