"""vLLM's sampling extensions, as vLLM's users send them: min_tokens, min_p, stop_token_ids,
include_stop_str_in_output and stream_options.continuous_usage_stats."""

from __future__ import annotations

import json

USER = {"role": "user", "content": "舌红苔黄腻，是什么证型？"}


def _chat(http, **fields) -> dict:
    response = http.post("/v1/chat/completions", json={"messages": [USER], "temperature": 0} | fields)
    assert response.status_code == 200, response.text
    return response.json()


def _first_token_id(http) -> int:
    """The greedy answer's first token, read back through /tokenize."""
    text = _chat(http, max_tokens=1, ignore_eos=True)["choices"][0]["message"]["content"]
    tokens = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(tokens) == 1, "the tiny checkpoint's first greedy token is one visible token"
    return tokens[0]


def test_stop_token_ids_end_the_answer_and_min_tokens_holds_them_off(server):
    with server.client() as http:
        first = _first_token_id(http)
        stopped = _chat(http, max_tokens=8, ignore_eos=True, stop_token_ids=[first])
        assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
        assert stopped["choices"][0]["message"]["content"] == ""  # the stop token is not text
        held = _chat(http, max_tokens=4, ignore_eos=True, stop_token_ids=[first], min_tokens=4)
        assert held["choices"][0]["finish_reason"] == "length" and held["usage"]["completion_tokens"] == 4
        for field, value in (("stop_token_ids", [10**9]), ("min_tokens", 9)):
            response = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 8, field: value})
            assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_stop_strings_are_cut_or_kept_and_wait_for_min_tokens(server):
    with server.client() as http:
        text = _chat(http, max_tokens=12, ignore_eos=True)["choices"][0]["message"]["content"]
        at = next(i for i in range(2, len(text)) if text.find(text[i]) == i and not text[i].isspace())
        stop = text[at]
        cut = _chat(http, max_tokens=12, ignore_eos=True, stop=[stop])["choices"][0]
        assert (cut["message"]["content"], cut["finish_reason"]) == (text[:at], "stop")
        kept = _chat(http, max_tokens=12, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
        assert kept["choices"][0]["message"]["content"] == text[: at + 1]
        late = _chat(http, max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=12)["choices"][0]
        assert (late["message"]["content"], late["finish_reason"]) == (text, "length")


def test_min_p_of_one_keeps_only_the_likeliest_token(server):
    with server.client() as http:
        greedy = _chat(http, max_tokens=16, ignore_eos=True)["choices"][0]["message"]["content"]
        sampled = _chat(http, max_tokens=16, ignore_eos=True, temperature=1.0, min_p=1.0, seed=5)
        assert sampled["choices"][0]["message"]["content"] == greedy
        assert http.post("/v1/chat/completions", json={"messages": [USER], "min_p": 1.5}).status_code == 400


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server):
    body = {"messages": [USER], "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with server.client() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                      if line.startswith("data: {")]
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert all(chunk["usage"]["prompt_tokens"] > 0 for chunk in chunks)
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_logprobs_name_each_token_and_the_likeliest_in_openais_shape(server):
    """Through the openai client: greedy, so each token is its own likeliest; the log-probabilities are the model's
    (each at most 0, the likeliest sorted), streamed or not, and the same either way."""
    client = server.openai()
    plain = client.chat.completions.create(model=server.settings.model_name, messages=[USER], max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens == 6
    text = b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace")  # random weights: stray bytes
    assert text == plain.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert [top.logprob for top in entry.top_logprobs] == sorted((top.logprob for top in entry.top_logprobs),
                                                                     reverse=True)
    stream = client.chat.completions.create(model=server.settings.model_name, messages=[USER], max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [entry for chunk in stream for choice in chunk.choices if choice.logprobs
                for entry in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    without = client.chat.completions.create(model=server.settings.model_name, messages=[USER], max_tokens=2)
    assert without.choices[0].logprobs is None
