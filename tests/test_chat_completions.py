"""Chat completions through the official openai client against the real server on the tiny checkpoint."""

from __future__ import annotations

from conftest import generate_greedy, image_data_url, tongue_photo
from transformers import AutoProcessor

from shizhen.protocol import ChatCompletionChunk, ChunkChoice, Delta
from shizhen.streaming import ContentChunks, sse


def test_text_completion_has_openai_shape_and_real_usage(server):
    client = server.openai()
    reply = client.chat.completions.create(
        model=server.settings.model_name,
        messages=[{"role": "user", "content": "舌红苔黄是什么意思？"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == server.settings.model_name
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    processor = AutoProcessor.from_pretrained(server.settings.model)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "舌红苔黄是什么意思？"}], tokenize=False, add_generation_prompt=True
    )
    assert reply.usage.prompt_tokens == len(processor.tokenizer(prompt)["input_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_greedy_output_equals_model_generate(server):
    question = "请从中医角度解读这张舌苔。"
    photo = tongue_photo()
    for content, images in [
        (question, []),
        ([{"type": "image_url", "image_url": {"url": image_data_url(photo)}}, {"type": "text", "text": question}],
         [photo]),
    ]:
        reply = server.openai().chat.completions.create(
            model=server.settings.model_name, messages=[{"role": "user", "content": content}], max_tokens=40,
            temperature=0,
        )
        template_content = content if isinstance(content, str) else [{"type": "image"}, {"type": "text", "text": question}]
        expected, count = generate_greedy(
            server.settings.model, [{"role": "user", "content": template_content}], images, 40
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage.completion_tokens == count


def test_image_tokens_count_in_prompt_usage(server):
    client = server.openai()
    text_only = client.chat.completions.create(
        model=server.settings.model_name, messages=[{"role": "user", "content": "看舌"}], max_tokens=1
    )
    with_image = client.chat.completions.create(
        model=server.settings.model_name,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(tongue_photo(), "JPEG")}},
            {"type": "text", "text": "看舌"},
        ]}],
        max_tokens=1,
    )
    extra = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert 4 + 2 <= extra <= 64 // 4 * 4 + 2  # image tokens (bounded by image_max_pixels) + vision start/end


def test_multi_turn_with_image_in_earlier_turn_and_webp(server):
    reply = server.openai().chat.completions.create(
        model=server.settings.model_name,
        messages=[
            {"role": "system", "content": "你是一位中医。"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(tongue_photo(), "WEBP")}},
                {"type": "text", "text": "这是我的舌头。"},
            ]},
            {"role": "assistant", "content": "舌淡红，苔薄白。"},
            {"role": "user", "content": "那我需要注意什么？"},
        ],
        max_tokens=8,
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens > 30


def test_streaming_with_usage_matches_non_streaming(server):
    client = server.openai()
    request = dict(
        model=server.settings.model_name, messages=[{"role": "user", "content": "舌苔厚腻"}], max_tokens=30,
        temperature=0,
    )
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content for c in content_chunks) == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_deltas_are_whole_characters(server):
    """Random weights emit multi-byte characters split across tokens; no delta may carry a split character."""
    with server.client() as http:
        with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "舌诊舌诊舌诊"}], "max_tokens": 200, "stream": True,
            "seed": 3, "temperature": 1.0, "ignore_eos": True,
        }) as response:
            raw = b"".join(response.iter_bytes())
    raw.decode("utf-8")  # the SSE stream as a whole is valid UTF-8
    deltas = [line for line in raw.split(b"\n") if line.startswith(b"data: {")]
    assert len(deltas) > 3
    for line in deltas:
        line.decode("utf-8")


def test_seed_makes_sampling_reproducible(server):
    client = server.openai()
    request = dict(model=server.settings.model_name, messages=[{"role": "user", "content": "舌"}], max_tokens=24,
                   temperature=1.0, top_p=0.95, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**request, seed=1234).choices[0].message.content
    second = client.chat.completions.create(**request, seed=1234).choices[0].message.content
    others = {client.chat.completions.create(**request, seed=s).choices[0].message.content for s in range(4)}
    assert first == second
    assert len(others) > 1


def test_stop_string_ends_output_and_is_not_included(server):
    client = server.openai()
    request = dict(model=server.settings.model_name, messages=[{"role": "user", "content": "舌淡苔白"}],
                   max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**request).choices[0].message.content
    printable = [i for i, ch in enumerate(full) if ch.isprintable() and ch != "\ufffd"]
    cut = printable[len(printable) // 2]
    stop = full[cut : cut + 2]
    stopped = client.chat.completions.create(**request, stop=[stop, "never-appears"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.find(stop)]
    streamed = client.chat.completions.create(**request, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.find(stop)]


def test_max_completion_tokens_and_default_max_tokens(server):
    client = server.openai()
    limited = client.chat.completions.create(
        model=server.settings.model_name, messages=[{"role": "user", "content": "舌"}], max_completion_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert limited.usage.completion_tokens == 5 and limited.choices[0].finish_reason == "length"
    default = client.chat.completions.create(
        model=server.settings.model_name, messages=[{"role": "user", "content": "舌"}],
        extra_body={"ignore_eos": True},
    )
    assert default.usage.completion_tokens == server.settings.default_max_tokens


def test_unknown_fields_are_ignored_and_developer_role_accepted(server):
    with server.client() as http:
        response = http.post("/v1/chat/completions", json={
            "messages": [{"role": "developer", "content": "简洁"}, {"role": "user", "content": "舌"}],
            "max_tokens": 3, "user": "clinic-42", "parallel_tool_calls": False, "some_future_field": {"x": 1},
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "top_k": 5,
        })
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3


def test_models_endpoints(server):
    client = server.openai()
    models = client.models.list().data
    assert [m.id for m in models] == [server.settings.model_name]
    card = client.models.retrieve(server.settings.model_name)
    assert card.object == "model"
    extra = card.model_extra
    assert extra["random_test_model"] is True and "RANDOM TEST MODEL" in extra["description"]
    assert extra["max_model_len"] == 4096
    assert extra["limits"]["max_images_per_request"] == server.settings.max_images_per_request


def test_spliced_content_chunks_are_the_chunk_models_json():
    """The hot path's content chunks are spliced, not built: byte for byte what the chunk model would write."""
    def chunk(text: str) -> str:
        return sse(ChatCompletionChunk(id="chatcmpl-1", created=1, model="m",
                                        choices=[ChunkChoice(delta=Delta(content=text))]))

    spliced = ContentChunks(chunk(ContentChunks.SPLICE))
    for text in ("舌红苔黄", 'a "quote" \\ slash', "line\nnext\t\r\b\f", "\x00\x1f\x7f", "\u2028\u2029 🙂 é", "</script>"):
        assert spliced(text) == chunk(text)
