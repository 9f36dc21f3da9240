"""Prompt caching and chunked prefill on the real ShizhenGPT-32B-VL configuration (random bf16 weights), each beside
its baseline in the same run and the same engine (the prefix cache turned off; whole prompts in one prefill step):

  - consultation: a photo consultation continued for three turns, each turn resending the whole conversation as
    clients do: TTFT of turns 1-4 with the caches (prefix and photo encodings) on and off, and how many times the
    photo went through the vision tower;
  - photo_burst: 32 streams decoding when 16 phone photos arrive at once: the 32's largest and p99 inter-token gap
    while the photos prefill, and the photos' TTFT, per prefill budget;
  - long_prompt: an 8k-token prompt arriving while 32 streams decode: their largest gap and its TTFT, per budget.

Prints JSON lines; `--json PATH` also writes them. `--tiny` runs a tiny config on CPU (smoke test).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from common import emit, percentile, write_json
from PIL import Image
from engine_throughput import build, image_prompt, run_requests, start_engine, text_prompt

from shizhen.engine.core import EngineCore
from shizhen.engine.loader import LoadedModel
from shizhen.engine.prompt import ChatTurn, PromptBuilder

STREAMS, STREAM_TOKENS = 32, 384
WHOLE_PROMPTS = 1 << 20  # a prefill budget no prompt reaches: every prompt in one step, as before chunking


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


# what the real model answers re-tokenizes as it was generated; a random model's tokens do not, so the turns carry a
# doctor's answer of about its length (64 tokens) instead of the random model's
ANSWER = "舌淡红，苔薄白微腻，边有齿痕，提示脾虚湿盛。建议健脾祛湿，饮食清淡，少食生冷油腻，适当运动，规律作息。"


def consultation(engine: EngineCore, loaded: LoadedModel, rows: list[dict], caching: bool) -> None:
    """Four turns about one (new) photo, each resending the conversation so far."""
    # bench-only switches: the same engine with its prefix cache and photo encodings bypassed
    engine._scheduler._blocks.caching = caching
    encodings = engine._runner.image_encodings
    capacity, encodings.capacity_tokens = encodings.capacity_tokens, encodings.capacity_tokens if caching else 0
    builder = PromptBuilder(loaded.processor, engine.config.image_min_pixels, engine.config.image_max_pixels)
    photo = Image.effect_noise((448, 448), 50).convert("RGB")  # a new one each run
    turns = [ChatTurn("user", (photo, "请从中医角度解读这张舌苔。"))]
    misses_before = encodings.misses
    ttfts, prompts, cached = [], [], []
    for question in ("需要忌口吗？", "大概要调理多久？", "平时要注意什么？", None):
        prompt = builder.build(turns)
        [timeline] = run_requests(engine, [prompt], [64], [0])
        ttfts.append(_ms(timeline.first - timeline.submitted))
        prompts.append(prompt.num_tokens)
        cached.append(timeline.cached_tokens)
        turns += [ChatTurn("assistant", (ANSWER,)), ChatTurn("user", (question,))]
    emit(rows, {"bench": "consultation", "prefix_caching": caching, "ttft_ms_per_turn": ttfts,
                "prompt_tokens": prompts, "cached_tokens": cached, "photo_encodings": encodings.misses - misses_before})
    engine._scheduler._blocks.caching, encodings.capacity_tokens = True, capacity


def arrivals_during_decode(engine: EngineCore, rows: list[dict], label: str, budget: int, late_prompts: list,
                           run: int, arrive_at: float = 1.0) -> None:
    """STREAMS text streams (new prompts for each `run`: no cache hits) from 0 s, then `late_prompts` all at
    `arrive_at` s: the streams' gaps from then until the last late prompt's first token, and the late prompts'
    TTFT."""
    engine._scheduler._prefill_token_budget = budget  # bench-only: the same engine, another step budget
    streams = [text_prompt(200, 1000 * run + i) for i in range(STREAMS)]
    prompts = streams + late_prompts
    limits = [STREAM_TOKENS] * STREAMS + [8] * len(late_prompts)
    timelines = run_requests(engine, prompts, limits, [0.0] * STREAMS + [arrive_at] * len(late_prompts))
    late = timelines[STREAMS:]
    window = (min(t.submitted for t in late), max(t.first for t in late))
    gaps = [b - a for t in timelines[:STREAMS] for (a, _), (b, _) in zip(t.outputs, t.outputs[1:])
            if b >= window[0] and a <= window[1]]
    ttft = [t.first - t.submitted for t in late]
    emit(rows, {"bench": label, "prefill_token_budget": budget if budget != WHOLE_PROMPTS else "whole prompts",
                "streams": STREAMS, "arrivals": len(late_prompts), "arrival_prompt_tokens": late_prompts[0].num_tokens,
                "gaps_in_window": len(gaps), "gap_max_ms": _ms(max(gaps)), "gap_p99_ms": _ms(percentile(gaps, 0.99)),
                "gap_p50_ms": _ms(percentile(gaps, 0.5)), "ttft_p50_ms": _ms(percentile(ttft, 0.5)),
                "ttft_max_ms": _ms(max(ttft))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", default="32b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--budgets", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--long-prompt-tokens", type=int, default=8000)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    rows: list[dict] = []
    loaded, _ = build(argparse.Namespace(tiny=args.tiny, shape=args.shape, layers=args.layers, dtype=None))
    engine = start_engine(loaded, argparse.Namespace(max_len=max(args.long_prompt_tokens + 512, 4096),
                                                     max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.95,
                                                     eager=False, kv_cache_tokens=None))
    emit(rows, {"bench": "setup", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "layers": loaded.model.config.text_config.num_hidden_layers,
                "kv_capacity_tokens": engine.kv_capacity_tokens, "default_budget": engine.config.prefill_token_budget})
    run_requests(engine, [text_prompt(200, 1), image_prompt(loaded)], [16, 16], [0, 0])  # warm-up
    for caching in (False, True):
        consultation(engine, loaded, rows, caching)
    budgets = [WHOLE_PROMPTS, *args.budgets]
    for run, budget in enumerate(budgets, start=1):
        photos = [image_prompt(loaded, (1536, 1152), repeats=1) for _ in range(16)]  # new photos: no cache hits
        arrivals_during_decode(engine, rows, "photo_burst", budget, photos, run)
    for run, budget in enumerate(budgets, start=len(budgets) + 1):
        long_prompt = text_prompt(args.long_prompt_tokens, 1000 * run + 999)
        arrivals_during_decode(engine, rows, "long_prompt", budget, [long_prompt], run)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
