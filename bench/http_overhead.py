"""What the server costs over the engine: the same streaming workload through `shizhen serve` (HTTP, the API
process and the engine process) and engine-direct (an EngineCore driven in this process), at 1, 64 and 256 streams.

On a GPU (the `device` tool) it writes a 7B-VL-shaped checkpoint with random bf16 weights to disk, serves it with
the real command, then loads the same folder the server's way for the engine-direct run; `--tiny` runs the same on
the tiny checkpoint (CPU smoke test). The streams arrive evenly over `--arrivals-over` seconds, greedy, `--tokens`
tokens each (ignore_eos).
Prints JSON lines: per mode and concurrency the aggregate tok/s, TTFT p50 and the gaps between content chunks
(p50/p99), then HTTP/direct ratios; `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, percentile, run_core, serve_tiny, write_json
from engine_throughput import build

from shizhen.config import Settings
from shizhen.engine.core import EngineConfig, EngineCore
from shizhen.engine.loader import load_model
from shizhen.engine.prompt import ChatTurn, PromptBuilder
from shizhen.engine.request import GenerationRequest
from shizhen.engine.sampling import SamplingParams
from shizhen.tiny_checkpoint import build_tiny_checkpoint

QUESTION = "舌红苔黄腻，脉滑数，是什么证型？应当如何调理？" * 6
CLIENT_PROCESSES = 8
CLIENT_START_S = 5.0  # for the client processes to start before a run


def summary(mode: str, streams: int, started: float, timelines: list[tuple[float, list[float], int]]) -> dict:
    """`timelines`: (submitted, content-chunk times, tokens) per stream."""
    finished = max(chunks[-1] for _, chunks, _ in timelines)
    gaps = [b - a for _, chunks, _ in timelines for a, b in zip(chunks, chunks[1:])]
    ttft = [chunks[0] - submitted for submitted, chunks, _ in timelines]
    tokens = sum(count for _, _, count in timelines)
    return {"mode": mode, "streams": streams, "tokens": tokens,
            "aggregate_tok_per_s": round(tokens / (finished - started), 1),
            "ttft_p50_ms": round(percentile(ttft, 0.5) * 1e3, 1),
            "chunk_gap_p50_ms": round(percentile(gaps, 0.5) * 1e3, 2),
            "chunk_gap_p99_ms": round(percentile(gaps, 0.99) * 1e3, 2)}


def arrival_offsets(streams: int, spread: float) -> list[float]:
    """Seconds from a run's start at which each stream begins: evenly over `spread`, as users arrive (a burst of
    identical instants would measure how admission batches prompts, not what the server costs)."""
    return [spread * i / streams for i in range(streams)]


def http_runs(url: str, streams_list: list[int], tokens: int, spread: float) -> list[dict]:
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    results = []
    for streams in [1, *streams_list]:  # the first run warms up
        start_at = time.monotonic() + CLIENT_START_S
        arrivals = [start_at + offset for offset in arrival_offsets(streams, spread)]
        processes = min(CLIENT_PROCESSES, streams)
        clients = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "sse_client.py"), url, body,
                                     json.dumps(arrivals[i::processes])], stdout=subprocess.PIPE, text=True)
                   for i in range(processes)]
        timelines = []
        for client in clients:
            output, _ = client.communicate(timeout=900)
            timelines += [(t["submitted"], t["chunks"], t["tokens"]) for t in json.loads(output)]
        assert all(count == tokens for _, _, count in timelines)
        results.append(summary("http", streams, start_at, timelines))
    return results[1:]


def direct_runs(folder: Path, config: EngineConfig, streams_list: list[int], tokens: int,
                spread: float) -> list[dict]:
    """The server's load path, its engine configuration and its prompt, without HTTP or a second process."""
    core = EngineCore(load_model(str(folder)), config)
    prompt = PromptBuilder.from_folder(str(folder), config.image_min_pixels, config.image_max_pixels).build(
        [ChatTurn("user", (QUESTION,))])
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    results = []
    for run, streams in enumerate([1, *streams_list]):
        requests = [GenerationRequest(f"direct-{run}-{i}", prompt, params) for i in range(streams)]
        time.sleep(CLIENT_START_S)  # the GPU idles as long as it does while HTTP clients start (its clocks drop)
        started = time.perf_counter()
        timelines = run_core(core, requests, arrival_offsets(streams, spread))
        results.append(summary("direct", streams, started, [(t.submitted, [at for at, _ in t.outputs], t.tokens)
                                                             for t in timelines]))
    return results[1:]


def ratios(http: list[dict], direct: list[dict], rows: list[dict]) -> None:
    for over_http, over_direct in zip(http, direct, strict=True):
        emit(rows, {"ratio": "http/direct", "streams": over_http["streams"],
                    "tok_per_s": round(over_http["aggregate_tok_per_s"] / over_direct["aggregate_tok_per_s"], 3),
                    "chunk_gap_p50": round(over_http["chunk_gap_p50_ms"] / over_direct["chunk_gap_p50_ms"], 3),
                    "chunk_gap_p99": round(over_http["chunk_gap_p99_ms"] / over_direct["chunk_gap_p99_ms"], 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint (CPU smoke test)")
    parser.add_argument("--streams", type=int, nargs="*", default=[1, 64, 256])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--arrivals-over", type=float, default=1.0, help="seconds the streams' arrivals spread over")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict] = []
    folder = Path(tempfile.mkdtemp(prefix="shizhen-http-bench-"))
    try:
        if args.tiny:
            build_tiny_checkpoint(folder)
        else:
            loaded, _ = build(argparse.Namespace(tiny=False, shape="7b", layers=None, dtype=None))
            loaded.model.save_pretrained(folder, max_shard_size="5GB")
            loaded.processor.save_pretrained(folder)
            del loaded
            gc.collect()
            torch.cuda.empty_cache()
        max_num_seqs = max(args.streams)
        settings = Settings()  # the server's defaults, for what is not set here
        emit(rows, {"bench": "setup", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "checkpoint": "tiny" if args.tiny else "7B-VL-shaped, random bf16, on disk",
                    "max_num_seqs": max_num_seqs, "tokens_per_stream": args.tokens})
        server = serve_tiny(folder, args.port, "--max-num-seqs", str(max_num_seqs), "--max-context-length",
                            str(args.max_len), "--max-tokens-limit", str(args.max_len), "--default-max-tokens",
                            str(args.tokens), "--max-waiting-requests", str(4 * max_num_seqs), ready_timeout=900)
        try:
            http = http_runs(f"http://127.0.0.1:{args.port}", args.streams, args.tokens, args.arrivals_over)
        finally:
            server.terminate()
            server.wait(60)
        for row in http:
            emit(rows, row)
        config = EngineConfig(max_len=args.max_len, image_min_pixels=settings.image_min_pixels,
                              image_max_pixels=settings.image_max_pixels, max_num_seqs=max_num_seqs,
                              gpu_memory_utilization=settings.gpu_memory_utilization)
        direct = direct_runs(folder, config, args.streams, args.tokens, args.arrivals_over)
        for row in direct:
            emit(rows, row)
        ratios(http, direct, rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
