"""Continuous batching must not change answers: staggered text and image requests of different lengths, run
together — and preempted and recomputed when the KV cache runs out — each get exactly what plain `generate` gives
that request alone (greedy)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import TEST_LIMITS, generate_greedy, image_data_url, tongue_photo

from shizhen.engine.core import EngineConfig, EngineCore
from shizhen.engine.loader import load_model
from shizhen.engine.prompt import ChatTurn, PromptBuilder
from shizhen.engine.request import GenerationRequest
from shizhen.engine.sampling import SamplingParams

QUESTIONS = ["舌红苔黄", "请从中医角度解读这张舌苔。舌体胖大有齿痕，苔白腻。", "What does a pale tongue mean?"]


def _cases(max_tokens=(7, 90, 60, 12, 150, 40)):
    """Text and image requests in turn, each question with and without a photo."""
    cases = []
    for i, question in enumerate(QUESTIONS):
        cases.append((question, [], max_tokens[2 * i]))
        photo = tongue_photo(120 + 40 * i, 100 + 30 * i)
        cases.append(([{"type": "image_url", "image_url": {"url": image_data_url(photo)}},
                       {"type": "text", "text": question}], [photo], max_tokens[2 * i + 1]))
    return cases


def _ask_staggered(server, cases, spacing: float = 0.015) -> tuple[dict[int, dict], int]:
    """Send the cases with arrivals `spacing` seconds apart (earlier requests are mid-decode); returns the replies
    by case index and the most requests seen running at once."""
    replies: dict[int, dict] = {}

    def ask(index, content, max_tokens):
        time.sleep(spacing * index)
        with server.client() as http:
            replies[index] = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            }).json()

    threads = [threading.Thread(target=ask, args=(i, content, max_tokens))
               for i, (content, _, max_tokens) in enumerate(cases)]
    for thread in threads:
        thread.start()
    peak_running = 0
    while any(thread.is_alive() for thread in threads):
        peak_running = max(peak_running, server.engine.stats.running)
        time.sleep(0.001)
    return replies, peak_running


def _assert_each_matches_generate_alone(server, cases, replies) -> None:
    for index, (content, images, max_tokens) in enumerate(cases):
        template = content if isinstance(content, str) else [
            {"type": "image"} if part["type"] == "image_url" else part for part in content]
        expected, count = generate_greedy(server.settings.model, [{"role": "user", "content": template}], images,
                                          max_tokens)
        reply = replies[index]
        assert reply["choices"][0]["message"]["content"] == expected, f"request {index} differs"
        assert reply["usage"]["completion_tokens"] == count


@pytest.mark.parametrize("prefill_token_budget", [2048, 16], ids=["whole-prompts", "chunks-of-16"])
def test_staggered_batched_requests_match_generate_alone(start_server, prefill_token_budget):
    """Also with prompts prefilled 16 tokens a step (chunk boundaries inside images, and prompts prefilling while
    others decode), and once more from the prefix cache: the same answers."""
    server = start_server(prefill_token_budget=prefill_token_budget)
    cases = _cases()
    replies, peak_running = _ask_staggered(server, cases)
    assert peak_running >= 3, "the requests should have shared decode steps"
    _assert_each_matches_generate_alone(server, cases, replies)
    assert server.engine.stats.preemptions == 0
    again, _ = _ask_staggered(server, cases)
    assert [again[i]["choices"] for i in range(len(cases))] == [replies[i]["choices"] for i in range(len(cases))]
    assert all(again[i]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for i in range(len(cases))
               if replies[i]["usage"]["prompt_tokens"] > 64)


def test_preempted_requests_resume_and_still_match_generate_alone(start_server):
    """With a KV cache far smaller than the requests' answers, sequences outgrow it mid-answer: the newest ones are
    preempted and later recomputed, and every answer is still exactly what `generate` gives it alone."""
    server = start_server(max_context_length=256, kv_cache_tokens=256)  # 4 blocks of 64 positions
    cases = _cases(max_tokens=[140] * 6)  # any two answers together outgrow the cache
    replies, _ = _ask_staggered(server, cases, spacing=0.0)
    assert server.engine.stats.preemptions > 0
    _assert_each_matches_generate_alone(server, cases, replies)
    with server.client() as http:
        metrics = http.get("/metrics").text
    assert f"shizhen:num_preemptions_total {float(server.engine.stats.preemptions)}" in metrics


def test_more_requests_than_slots_wait_for_a_free_slot(start_server):
    server = start_server(max_num_seqs=2)
    results = []

    def ask():
        with server.client() as http:
            results.append(http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "舌"}], "max_tokens": 40, "ignore_eos": True}))

    threads = [threading.Thread(target=ask) for _ in range(7)]
    for thread in threads:
        thread.start()
    peak = 0
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, server.engine.stats.running)
        time.sleep(0.001)
    assert peak <= 2
    assert [r.status_code for r in results] == [200] * 7
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in results)


def test_a_preempted_seeded_request_draws_what_it_would_have_drawn(start_server):
    """Sampling with a seed and penalties: the answers are the same whether the KV cache is roomy or so small
    that requests are preempted and recomputed mid-answer."""
    def answers(server) -> list[str]:
        cases = _cases(max_tokens=[140] * 6)
        results: dict[int, str] = {}

        def ask(index, content):
            with server.client() as http:
                results[index] = http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": content}], "max_tokens": 140, "temperature": 0.9,
                    "seed": 1000 + index, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "ignore_eos": True,
                }).json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i, content)) for i, (content, _, _) in enumerate(cases)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [results[i] for i in range(len(cases))]

    roomy = start_server(max_context_length=256)
    cramped = start_server(max_context_length=256, kv_cache_tokens=256)
    assert answers(cramped) == answers(roomy)
    assert cramped.engine.stats.preemptions > 0 and roomy.engine.stats.preemptions == 0


def test_a_long_prompt_arriving_never_holds_back_a_decoding_stream(tiny_checkpoint):
    """Prefilled in chunks of the step's token budget, a long prompt shares every step with the stream already
    decoding: each step still gives that stream its next token, and the long prompt's first token comes after
    as many steps as it has chunks."""
    loaded = load_model(str(tiny_checkpoint))
    config = EngineConfig(max_len=2048, image_min_pixels=TEST_LIMITS["image_min_pixels"],
                          image_max_pixels=TEST_LIMITS["image_max_pixels"], max_num_seqs=4, prefill_token_budget=64)
    core = EngineCore(loaded, config)
    builder = PromptBuilder(loaded.processor, config.image_min_pixels, config.image_max_pixels)
    core.add(GenerationRequest("decoding", builder.build([ChatTurn("user", ("舌红",))]),
                               SamplingParams(max_new_tokens=500, ignore_eos=True)))
    while not any(output[0] == "decoding" and output[1] for output in core.step()):
        pass
    long_prompt = builder.build([ChatTurn("user", ("舌苔黄腻，脉滑数。" * 60,))])
    core.add(GenerationRequest("long", long_prompt, SamplingParams(max_new_tokens=3)))
    steps = 0
    while True:
        outputs = {output[0]: output for output in core.step()}
        steps += 1
        assert len(outputs["decoding"][1]) == 1, f"step {steps} gave the decoding stream no token"
        if "long" in outputs:
            break
    assert steps >= long_prompt.num_tokens // 64 > 5
