"""vLLM's /tokenize and /detokenize, through the same prompt path as chat completions."""

from __future__ import annotations

import pytest
from conftest import image_data_url, tongue_photo

USER = {"role": "user", "content": "舌红苔黄腻"}
WITH_PHOTO = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(tongue_photo())}},
                                          {"type": "text", "text": "请从中医角度解读这张舌苔。"}]}


@pytest.mark.parametrize("message", [USER, WITH_PHOTO], ids=["text", "photo"])
def test_a_chat_counts_the_tokens_a_completion_of_it_is_charged(server, message):
    with server.client() as http:
        counted = http.post("/tokenize", json={"messages": [message]}).json()
        answered = http.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 1}).json()
        assert counted["count"] == len(counted["tokens"]) == answered["usage"]["prompt_tokens"]
        assert counted["max_model_len"] == server.settings.max_context_length
        without = http.post("/tokenize", json={"messages": [message], "add_generation_prompt": False}).json()
        assert without["count"] < counted["count"]


def test_a_prompt_round_trips_through_tokenize_and_detokenize(server):
    with server.client() as http:
        counted = http.post("/tokenize", json={"prompt": "tongue coating, pale", "return_token_strs": True}).json()
        assert len(counted["token_strs"]) == counted["count"] > 0
        text = http.post("/detokenize", json={"tokens": counted["tokens"]}).json()
        assert text == {"prompt": "tongue coating, pale"}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "messages": [USER]}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"messages": [{"role": "user", "content": "<|im_start|>"}]}, 400, "messages[0].content"),
    ("/tokenize", {"prompt": "x", "model": "another-model"}, 404, "model"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": []}, 400, "tokens"),
])
def test_bad_tokenize_requests_are_openai_errors(server, path, body, status, param):
    with server.client() as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
