"""The cost of a JSON-schema constraint during decoding, on the real ShizhenGPT-32B-VL configuration (random bf16
weights, Qwen's 152k vocabulary), against the same requests unconstrained in the same run.

Engine-direct (EngineCore in this process). Each request writes exactly 256 tokens: the schema's one free string
(`findings`) keeps a random model inside it until max_tokens, so both runs decode the same number of tokens and
every constrained step computes a mask over the whole vocabulary. Prints JSON lines; `--json PATH` also writes them.
`--tiny` runs a tiny config (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from common import emit, percentile, run_core, write_json
from engine_throughput import PROMPT_TOKENS, SHAPES, build, start_engine, text_prompt

from shizhen.engine.request import GenerationRequest
from shizhen.engine.sampling import SamplingParams

NEW_TOKENS = 256
SCHEMA = {"type": "object", "properties": {"findings": {"type": "string"}, "severity": {"type": "integer"}},
          "required": ["findings", "severity"]}


def measure(engine, concurrency: int, grammar: tuple[str, str] | None, label: str, rows: list[dict]) -> None:
    requests = [GenerationRequest(f"{label}-{concurrency}-{i}-{time.perf_counter_ns()}",
                                  text_prompt(PROMPT_TOKENS, 1000 + i),
                                  SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=i, grammar=grammar))
               for i in range(concurrency)]
    arrivals = [i / concurrency for i in range(concurrency)] if concurrency > 1 else [0.0]
    started = time.perf_counter()
    timelines = run_core(engine, requests, arrivals)
    finished = max(timeline.last for timeline in timelines)
    tokens = sum(timeline.tokens for timeline in timelines)
    gaps = [gap for timeline in timelines for gap in timeline.gaps()]
    single = timelines[0]
    emit(rows, {"bench": "structured_outputs", "constraint": label, "requests": concurrency,
                "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "tokens": tokens,
                "aggregate_tok_per_s": round(tokens / (finished - started), 1),
                "decode_tok_per_s_first_stream": round((single.tokens - 1) / (single.last - single.first), 1),
                "itl_p50_ms": round(percentile(gaps, 0.5) * 1e3, 2), "itl_p99_ms": round(percentile(gaps, 0.99) * 1e3, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="32b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.dtype, args.max_len, args.max_num_seqs, args.eager, args.kv_cache_tokens = None, 1024, 64, False, None
    args.gpu_memory_utilization = 0.95
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rows: list[dict] = []
    loaded, _ = build(args)
    emit(rows, {"bench": "setup", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "layers": loaded.model.config.text_config.num_hidden_layers, "vocab": loaded.vocab_size})
    engine = start_engine(loaded, args)
    grammar = ("json_schema", json.dumps(SCHEMA))
    measure(engine, 2, grammar, "warm-up", [])  # compiles the schema once (the cache serves the rest)
    for concurrency in args.concurrency:
        measure(engine, concurrency, None, "none", rows)
        measure(engine, concurrency, grammar, "json_schema", rows)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
