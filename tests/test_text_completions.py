"""`/v1/completions` (the legacy text completions) through the official openai client and httpx."""

from __future__ import annotations

import json

import openai
import pytest

USER = {"role": "user", "content": "舌红苔黄腻，是什么证型？"}


def test_a_raw_prompt_of_the_chat_templates_tokens_answers_as_the_chat_does(server):
    client = server.openai()
    with server.client() as http:
        tokens = http.post("/tokenize", json={"messages": [USER]}).json()["tokens"]
    chat = client.chat.completions.create(model=server.settings.model_name, messages=[USER], max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(model=server.settings.model_name, prompt=tokens, max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert text.choices[0].text == chat.choices[0].message.content
    assert text.choices[0].finish_reason == "length"
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (len(tokens), 12)


def test_a_text_prompt_streams_what_it_answers_whole_with_logprobs(server):
    client = server.openai()
    prompt = "<|im_start|>user\n舌苔白厚<|im_end|>\n<|im_start|>assistant\n"  # raw prompts may write the template
    whole = client.completions.create(model=server.settings.model_name, prompt=prompt, max_tokens=8, temperature=0,
                                      logprobs=2, extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert all(len(top) <= 2 and max(top.values()) == value
               for top, value in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(8)]
    stream = client.completions.create(model=server.settings.model_name, prompt=prompt, max_tokens=8, temperature=0,
                                       logprobs=2, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] \
        == logprobs.text_offset
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["one", "two"]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 2}, "best_of"), ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "舌" * 20_000, "max_tokens": 8}, "prompt"), ({"prompt": "x", "max_tokens": 5000}, "max_tokens")])
def test_what_cannot_be_answered_is_a_400_naming_the_field(server, body, param):
    with server.client() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_openai_client_sees_refusals_as_its_own_errors(server):
    with pytest.raises(openai.BadRequestError):
        server.openai().completions.create(model=server.settings.model_name, prompt="x", n=2)
    with server.client() as http:
        one = http.post("/v1/completions", json={"prompt": ["x"], "max_tokens": 2})
    assert one.status_code == 200 and json.loads(one.text)["choices"][0]["index"] == 0
