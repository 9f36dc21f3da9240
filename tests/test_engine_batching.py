"""Continuous batching must not change answers: staggered text and image requests of different lengths, run
together, each get exactly what plain `generate` gives that request alone (greedy)."""

from __future__ import annotations

import threading
import time

from conftest import generate_greedy, image_data_url, tongue_photo

QUESTIONS = ["舌红苔黄", "请从中医角度解读这张舌苔。舌体胖大有齿痕，苔白腻。", "What does a pale tongue mean?"]


def _cases():
    cases = []
    for i, question in enumerate(QUESTIONS):
        cases.append((question, [], [7, 60, 150][i]))
        photo = tongue_photo(120 + 40 * i, 100 + 30 * i)
        cases.append(([{"type": "image_url", "image_url": {"url": image_data_url(photo)}},
                       {"type": "text", "text": question}], [photo], [90, 12, 40][i]))
    return cases


def test_staggered_batched_requests_match_generate_alone(server):
    cases = _cases()
    replies: dict[int, dict] = {}
    peak_running = 0

    def ask(index, content, max_tokens):
        time.sleep(0.015 * index)  # arrivals spread while earlier requests are mid-decode
        with server.client() as http:
            replies[index] = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            }).json()

    threads = [threading.Thread(target=ask, args=(i, content, max_tokens))
               for i, (content, _, max_tokens) in enumerate(cases)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak_running = max(peak_running, server.engine.running)
        time.sleep(0.001)
    assert peak_running >= 3, "the requests should have shared decode steps"

    for index, (content, images, max_tokens) in enumerate(cases):
        template = content if isinstance(content, str) else [
            {"type": "image"} if part["type"] == "image_url" else part for part in content]
        expected, count = generate_greedy(server.settings.model, [{"role": "user", "content": template}], images,
                                          max_tokens)
        reply = replies[index]
        assert reply["choices"][0]["message"]["content"] == expected, f"request {index} differs"
        assert reply["usage"]["completion_tokens"] == count


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
        peak = max(peak, server.engine.running)
        time.sleep(0.001)
    assert peak <= 2
    assert [r.status_code for r in results] == [200] * 7
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in results)
