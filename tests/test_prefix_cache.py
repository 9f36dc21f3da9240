"""Prompt caching: a conversation's next turn (photo included) reuses the KV blocks and the photo encoding of the
turns before it, says so in `usage.prompt_tokens_details.cached_tokens` and the metrics, and answers exactly what
it would without the cache."""

from __future__ import annotations

import re

from conftest import generate_greedy, image_data_url, tongue_photo

QUESTIONS = ["请看看我的舌象，是什么证型？", "需要忌口吗？", "大概要调理多久？"]


def _consult(server, max_tokens: int = 60) -> tuple[list[dict], list[dict]]:
    """A photo consultation of three turns, each resending the whole conversation with the answers so far, as the
    page and every chat client do; returns the replies and the last conversation (the photo as an image part)."""
    photo = image_data_url(tongue_photo())
    messages, replies = [], []
    for turn, question in enumerate(QUESTIONS):
        content = [{"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": question}]
        messages.append({"role": "user", "content": content if turn == 0 else question})
        with server.client() as http:
            reply = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                             "temperature": 0}).json()
        replies.append(reply)
        assert "choices" in reply, reply
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    return replies, messages


def _template(messages: list[dict]) -> list[dict]:
    return [{**message, "content": [{"type": "image"} if part["type"] == "image_url" else part
                                    for part in message["content"]]}
            if isinstance(message["content"], list) else message for message in messages]


def test_a_photo_consultations_next_turns_reuse_its_blocks_and_photo_and_answer_the_same(start_server):
    server = start_server()
    replies, conversation = _consult(server)
    cached = [reply["usage"]["prompt_tokens_details"]["cached_tokens"] for reply in replies]
    prompts = [reply["usage"]["prompt_tokens"] for reply in replies]
    assert cached[0] == 0
    # each later turn finds at least every full block of the turn before's prompt (the photo in the first)
    assert cached[1] >= prompts[0] // 64 * 64 > 0 and cached[2] >= prompts[1] // 64 * 64
    assert all(count % 64 == 0 and count < prompt for count, prompt in zip(cached, prompts))
    stats = server.engine.stats
    assert stats.image_cache_misses == 1, "the resent photo went through the vision tower again"
    assert stats.prefix_hit_tokens == sum(cached) and stats.prefix_queried_tokens == sum(prompts)

    for turn, reply in enumerate(replies):  # what plain `generate` gives each turn's conversation alone
        history = _template(conversation[: 2 * turn + 1])
        expected, _ = generate_greedy(server.settings.model, history, [tongue_photo()], 60)
        assert reply["choices"][0]["message"]["content"] == expected, f"turn {turn + 1} differs"

    uncached = start_server(enable_prefix_caching=False)
    again, _ = _consult(uncached)
    assert [r["choices"][0]["message"]["content"] for r in again] == \
        [r["choices"][0]["message"]["content"] for r in replies]
    assert [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in again] == [0, 0, 0]


def test_cached_tokens_in_streamed_usage_and_the_metrics(server):
    client = server.openai()
    system = {"role": "system", "content": "你是一位中医师。请根据舌象、脉象和症状辨证，给出调理建议。" * 4}
    usages = []
    for question in ("舌红苔黄，怎么办？", "舌淡苔白，怎么办？"):
        chunks = list(client.chat.completions.create(
            model=server.settings.model_name, messages=[system, {"role": "user", "content": question}],
            max_tokens=5, stream=True, stream_options={"include_usage": True}))
        usages.append(chunks[-1].usage)
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    shared = usages[1].prompt_tokens_details.cached_tokens  # the system prompt's full blocks
    assert shared >= 64 and shared % 64 == 0
    with server.client() as http:
        metrics = http.get("/metrics").text
    queried = float(re.search(r"^shizhen:prefix_cache_queries_total (\S+)$", metrics, re.M).group(1))
    hits = float(re.search(r"^shizhen:prefix_cache_hits_total (\S+)$", metrics, re.M).group(1))
    assert queried == usages[0].prompt_tokens + usages[1].prompt_tokens and hits == shared
