"""Engine speed on the real ShizhenGPT-32B-VL configuration with random bf16 weights, against plain `generate`.

Run on a GPU (the `device` tool); prints JSON lines, `--json PATH` also writes them:
  - baseline: `generate` (dynamic cache), one stream and a static batch, 200-token prompts, 256 new tokens;
  - engine: one stream (tok/s and GB/s of weights read), time to first token of text prompts of new lengths and of
    a 448x448 image + 200 text tokens,
    8/32/64 concurrent requests arriving over one second (aggregate tok/s, p50/p95 TTFT and inter-token latency),
    the same for 64 requests with a phone photo each (the largest image the server takes: prefill is mostly the
    vision tower's and the image tokens'),
    start-up time (memory planning + CUDA graph capture), KV capacity and peak GPU memory.
`--check` instead compares greedy outputs of staggered, batched text and image requests with `generate` alone on a
model of the real widths and `--layers` layers. `--tiny` runs either mode on a tiny config (CPU smoke test).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from common import Timeline, emit, percentile, replay_ms, run_core, write_json
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from shizhen.config import Settings
from shizhen.engine.core import EngineConfig, EngineCore
from shizhen.engine.loader import LoadedModel
from shizhen.engine.prompt import ChatTurn, PromptBuilder, PromptInputs
from shizhen.engine.request import GenerationRequest
from shizhen.engine.sampling import SamplingParams
from shizhen.tiny_checkpoint import QWEN_VL_CHAT_TEMPLATE, TINY_TEXT_SIZES, TINY_VISION_SIZES, build_tokenizer

QWEN_IDS = {"bos": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653, "image": 151655,
            "video": 151656}
TEXT_32B = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, max_position_embeddings=128000, rms_norm_eps=1e-6, vocab_size=152064,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION_32B = dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, out_hidden_size=5120,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SHAPES = {"32b": (TEXT_32B, VISION_32B), "7b": (TEXT_7B, VISION_7B)}
PROMPT_TOKENS, NEW_TOKENS = 200, 256



def build(args) -> tuple[LoadedModel, int]:
    """Random-weight model of the chosen configuration, and its processor (a padded tokenizer with Qwen's ids)."""
    if args.tiny:
        text, vision = dict(TINY_TEXT_SIZES, vocab_size=152064), TINY_VISION_SIZES
    else:
        text, vision = dict(SHAPES[args.shape][0]), SHAPES[args.shape][1]
    if args.layers:
        text["num_hidden_layers"] = args.layers
    text |= {"bos_token_id": QWEN_IDS["bos"], "eos_token_id": QWEN_IDS["eos"], "pad_token_id": QWEN_IDS["bos"]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IDS["image"],
                              video_token_id=QWEN_IDS["video"], vision_start_token_id=QWEN_IDS["vision_start"],
                              vision_end_token_id=QWEN_IDS["vision_end"], tie_word_embeddings=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    defaults = Settings()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=defaults.image_min_pixels,
                                              max_pixels=defaults.image_max_pixels),
        tokenizer=build_tokenizer(pad_vocab_to=QWEN_IDS["bos"]), video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_VL_CHAT_TEMPLATE)
    print(f"# built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {device} in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    text_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
    text_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    loaded = LoadedModel(model, processor, dtype, frozenset({QWEN_IDS["eos"], QWEN_IDS["bos"]}), {}, folder="")
    return loaded, text_bytes


def text_prompt(length: int, seed: int) -> PromptInputs:
    """A chat-shaped prompt of exactly `length` tokens with random content tokens."""
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(0, 150000, (length - 5,), generator=generator)
    head = torch.tensor([151644, 872, 198])  # <|im_start|>user\n
    tail = torch.tensor([151645, 151644])  # <|im_end|><|im_start|>
    return PromptInputs(input_ids=torch.cat([head, body, tail])[None])


def image_prompt(loaded: LoadedModel, size: tuple[int, int] = (448, 448), repeats: int = 40) -> PromptInputs:
    """A photo of `size` (noise: each call a different one) and the question `repeats` times (40: ~200 tokens)."""
    photo = Image.effect_noise(size, 50).convert("RGB")
    builder = PromptBuilder(loaded.processor, Settings().image_min_pixels, Settings().image_max_pixels)
    return builder.build([ChatTurn("user", (photo, "请从中医角度解读这张舌苔。" * repeats))])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def baseline_generate(loaded: LoadedModel, batch: int, rows: list[dict]) -> None:
    prompts = torch.cat([text_prompt(PROMPT_TOKENS, seed).input_ids for seed in range(batch)]).to(loaded.device)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    loaded.model.generate(prompts, **(kwargs | {"max_new_tokens": 16, "min_new_tokens": 16}))  # warm-up
    sync()
    started = time.perf_counter()
    loaded.model.generate(prompts, **kwargs)
    sync()
    elapsed = time.perf_counter() - started
    emit(rows, {"bench": "generate_baseline", "batch": batch, "prompt_tokens": PROMPT_TOKENS,
                "new_tokens": NEW_TOKENS, "seconds": round(elapsed, 2),
                "tok_per_s": round(batch * NEW_TOKENS / elapsed, 1)})


def run_requests(core: EngineCore, prompts: list[PromptInputs], max_tokens: list[int],
                 arrivals: list[float]) -> list[Timeline]:
    """Each prompt added at its arrival time, greedy, exactly `max_tokens` tokens each."""
    requests = [GenerationRequest(f"bench-{index}-{time.perf_counter_ns()}", prompt,
                                  SamplingParams(max_new_tokens=limit, temperature=0, ignore_eos=True))
                for index, (prompt, limit) in enumerate(zip(prompts, max_tokens, strict=True))]
    return run_core(core, requests, arrivals)


def start_engine(loaded: LoadedModel, args) -> EngineCore:
    defaults = Settings()
    return EngineCore(loaded, EngineConfig(
        max_len=args.max_len, image_min_pixels=defaults.image_min_pixels, image_max_pixels=defaults.image_max_pixels,
        max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.eager,
        kv_cache_tokens=args.kv_cache_tokens,
        prefill_token_budget=getattr(args, "prefill_token_budget", defaults.prefill_token_budget)))


def engine_benchmarks(engine: EngineCore, loaded: LoadedModel, text_bytes: int, rows: list[dict], args) -> None:
    run_requests(engine, [text_prompt(PROMPT_TOKENS, 99)] * 2, [32, 32], [0, 0])  # warm-up
    [single] = run_requests(engine, [text_prompt(PROMPT_TOKENS, 1)], [NEW_TOKENS], [0])
    decode_rate = (single.tokens - 1) / (single.last - single.first)
    emit(rows, {"bench": "engine_single_stream", "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
                "ttft_ms": round((single.first - single.submitted) * 1e3, 1), "decode_tok_per_s": round(decode_rate, 1),
                "end_to_end_tok_per_s": round(single.tokens / (single.last - single.submitted), 1),
                "weights_gb_per_s": round(decode_rate * text_bytes / 1e9, 1)})

    for length in (100, 300, 500):  # a new prompt length each: no per-shape warm-up helps
        [one] = run_requests(engine, [text_prompt(length, 3000 + length)], [1], [0])
        emit(rows, {"bench": "engine_text_ttft", "prompt_tokens": length,
                    "ttft_ms": round((one.first - one.submitted) * 1e3, 1)})

    run_requests(engine, [image_prompt(loaded)], [1], [0])  # warm-up of the vision tower
    ttfts = []
    for _ in range(3):
        image = image_prompt(loaded)  # a new photo each time: a resent one would come from the caches
        [one] = run_requests(engine, [image], [1], [0])
        ttfts.append(one.first - one.submitted)
    emit(rows, {"bench": "engine_image_ttft", "image": "448x448", "prompt_tokens": image.num_tokens,
                "image_tokens": image.num_image_tokens, "ttft_ms": round(statistics.median(ttfts) * 1e3, 1)})

    for concurrency in args.concurrency:
        prompts = [text_prompt(PROMPT_TOKENS, 1000 + i) for i in range(concurrency)]
        concurrent_requests(engine, prompts, rows, {"bench": "engine_concurrent", "prompt_tokens": PROMPT_TOKENS})
    for concurrency in args.photo_concurrency:  # phone photos, downscaled to the largest image the server takes
        prompts = [image_prompt(loaded, (1536, 1152), repeats=1) for _ in range(concurrency)]
        concurrent_requests(engine, prompts, rows, {
            "bench": "engine_concurrent_photos", "photo": "1536x1152",
            "prompt_tokens": prompts[0].num_tokens, "image_tokens": prompts[0].num_image_tokens})


def concurrent_requests(engine: EngineCore, prompts: list[PromptInputs], rows: list[dict], labels: dict) -> None:
    """The prompts arriving spread over one second, NEW_TOKENS each: aggregate tok/s, TTFT and inter-token latency."""
    concurrency = len(prompts)
    arrivals = [i / concurrency for i in range(concurrency)]
    preempted_before = engine.preemptions
    started = time.perf_counter()
    results = run_requests(engine, prompts, [NEW_TOKENS] * concurrency, arrivals)
    finished = max(timeline.last for timeline in results)
    ttft = [timeline.first - timeline.submitted for timeline in results]
    itl = [gap for timeline in results for gap in timeline.gaps()]
    emit(rows, labels | {"requests": concurrency, "new_tokens": NEW_TOKENS, "arrivals_over_s": 1.0,
                         "preemptions": engine.preemptions - preempted_before,
                         "aggregate_tok_per_s": round(concurrency * NEW_TOKENS / (finished - started), 1),
                         "ttft_p50_ms": round(percentile(ttft, 0.5) * 1e3, 1),
                         "ttft_p95_ms": round(percentile(ttft, 0.95) * 1e3, 1),
                         "itl_p50_ms": round(percentile(itl, 0.5) * 1e3, 2),
                         "itl_p95_ms": round(percentile(itl, 0.95) * 1e3, 2)})


def graph_step_times(engine: EngineCore, rows: list[dict]) -> None:
    """GPU time of one decode step alone (a graph replay), per batch bucket: the floor the engine loop sits on."""
    runner = engine._runner
    if not runner._graphs:
        return
    length = runner.length_buckets[0]
    for batch in (1, 8, 32, 64):
        if (batch, length) not in runner._graphs:
            continue
        step_ms = replay_ms(runner._graphs[(batch, length)])
        emit(rows, {"bench": "decode_graph_replay", "batch": batch, "attended_length": length,
                    "step_ms": round(step_ms, 2), "tok_per_s": round(batch * 1000 / step_ms, 1)})


def speed(args) -> list[dict]:
    rows: list[dict] = []
    loaded, text_bytes = build(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    emit(rows, {"bench": "setup", "device": device, "layers": loaded.model.config.text_config.num_hidden_layers,
                "text_weights_gb": round(text_bytes / 1e9, 2), "torch": torch.__version__})
    for batch in args.baseline_batches:
        baseline_generate(loaded, batch, rows)
    started = time.perf_counter()
    engine = start_engine(loaded, args)
    emit(rows, {"bench": "engine_startup", "seconds": round(time.perf_counter() - started, 1),
                "max_num_seqs": args.max_num_seqs, "max_len": args.max_len,
                "kv_capacity_tokens": engine.kv_capacity_tokens,
                "cuda_graphs": not args.eager and torch.cuda.is_available()})
    engine_benchmarks(engine, loaded, text_bytes, rows, args)
    graph_step_times(engine, rows)
    if torch.cuda.is_available():
        emit(rows, {"bench": "memory", "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)})
    return rows


def check(args) -> list[dict]:
    """Greedy outputs of batched, staggered requests vs `generate` alone, on the real widths."""
    rows: list[dict] = []
    loaded, _ = build(args)
    prompts = [text_prompt(60 + 70 * i, 500 + i) for i in range(3)] + [image_prompt(loaded)] * 2
    max_tokens = [40, 96, 17, 64, 30]
    expected = []
    with torch.inference_mode():
        for prompt, limit in zip(prompts, max_tokens):
            inputs = {"input_ids": prompt.input_ids.to(loaded.device)}
            if prompt.pixel_values is not None:
                inputs |= {"pixel_values": prompt.pixel_values.to(loaded.device, loaded.dtype),
                           "image_grid_thw": prompt.image_grid_thw.to(loaded.device),
                           "mm_token_type_ids": prompt.mm_token_type_ids.to(loaded.device)}
            ids = loaded.model.generate(**inputs, max_new_tokens=limit, min_new_tokens=limit, do_sample=False)
            expected.append(loaded.processor.tokenizer.decode(ids[0, prompt.num_tokens:], skip_special_tokens=True))
    engine = start_engine(loaded, args)
    # first as they come; then again in prefill chunks of 64 tokens (boundaries inside the images), from the
    # prefix cache the first run filled (bench-only switch of the step budget)
    for run in ("whole prompts", "64-token chunks + prefix cache"):
        results = run_requests(engine, prompts, max_tokens, [0.0, 0.01, 0.03, 0.05, 0.2])
        texts = [loaded.processor.tokenizer.decode(timeline.token_ids, skip_special_tokens=True)
                 for timeline in results]
        for index, (text, reference) in enumerate(zip(texts, expected)):
            common = next((i for i, (a, b) in enumerate(zip(text, reference)) if a != b),
                          min(len(text), len(reference)))
            emit(rows, {"bench": "greedy_check", "run": run, "request": index,
                        "image": prompts[index].pixel_values is not None, "max_tokens": max_tokens[index],
                        "identical": text == reference, "matching_chars": common, "chars": len(reference)})
        engine._scheduler._prefill_token_budget = 64
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare greedy outputs with generate instead")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (smoke test on CPU)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="32b", help="the model's widths (default 32b)")
    parser.add_argument("--layers", type=int, help="fewer text layers than the real 64")
    parser.add_argument("--max-len", type=int, default=2048, help="context per sequence (a photo prompt is ~800)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.95)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--kv-cache-tokens", type=int, help="cap the KV cache (small: the runs preempt)")
    parser.add_argument("--prefill-token-budget", type=int, default=Settings().prefill_token_budget,
                        help="prompt tokens prefilled per step (the server's default)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8, 32, 64])
    parser.add_argument("--photo-concurrency", type=int, nargs="*", default=[64],
                        help="concurrent requests with a largest-size photo each")
    parser.add_argument("--baseline-batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # the engine's start-up log: memory plan, graphs
    if args.check:
        args.max_len = max(args.max_len, 1024)  # the image prompts plus their completions
    rows = check(args) if args.check else speed(args)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
