"""Every bad request gets OpenAI's error envelope with the right status (never 422, never 500)."""

from __future__ import annotations

import base64

import pytest
from conftest import image_data_url, tongue_photo

USER = {"role": "user", "content": "舌"}


def _assert_error(response, status: int, *, param: str | None = None, contains: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        ({}, "messages", "required"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0]", "input_audio"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url",
         "required"),
        ({"messages": [USER], "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"messages": [USER], "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": [USER], "presence_penalty": 3}, "presence_penalty", "2"),
        ({"messages": [USER], "n": 2}, "n", "only n=1"),
        ({"messages": [USER], "top_logprobs": 3}, "top_logprobs", "needs logprobs"),
        ({"messages": [USER], "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"messages": [USER], "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"messages": [USER], "stop": [""]}, "stop", "empty"),
        ({"messages": [USER], "max_tokens": 99999}, "max_tokens", "at most 4000"),
        ({"messages": [{"role": "user", "content": "舌" * 300}], "max_tokens": 4000}, "max_tokens", "context"),
        ({"messages": [{"role": "user", "content": "舌" * 5000}]}, "messages", "context"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "need content"),
        ({"messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(tongue_photo())}}]}]},
         "messages[0].content[0]", "only accepted in user messages"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(tongue_photo())}}] * 5}]},
         "messages", "at most 4"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!!"}}]}]},
         "messages[0].content[0]", "base64"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://files.example/tongue.jpg"}}]}]},
         "messages[0].content[0]", "must be http(s) or a data: URL"),
    ],
)
def test_bad_requests_are_400_with_a_useful_message(server, body, param, contains):
    with server.client() as http:
        _assert_error(http.post("/v1/chat/completions", json=body), 400, param=param, contains=contains)


def test_malformed_json_is_400(server):
    with server.client() as http:
        response = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    _assert_error(response, 400, contains="not valid JSON")


def test_undecodable_and_non_image_data(server):
    truncated = base64.b64decode(image_data_url(tongue_photo(400, 300), "JPEG").split(",", 1)[1])[:600]
    cases = [
        (f"data:image/jpeg;base64,{base64.b64encode(truncated).decode()}", 400, "truncated"),
        (f"data:image/jpeg;base64,{base64.b64encode(b'this is a text file').decode()}", 415, "not an image"),
        (f"data:text/plain;base64,{base64.b64encode(b'hello').decode()}", 415, "not an image type"),
    ]
    with server.client() as http:
        for url, status, contains in cases:
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
            _assert_error(http.post("/v1/chat/completions", json=body), status, contains=contains)


def test_unknown_model_is_404(server):
    with server.client() as http:
        error = _assert_error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [USER]}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        _assert_error(http.get("/v1/models/gpt-4o"), 404)
        _assert_error(http.get("/v1/no-such-route"), 404)


def test_oversized_body_is_413_declared_or_streamed(start_server):
    server = start_server(max_request_bytes=64 * 1024)
    big = {"messages": [{"role": "user", "content": "舌" * 40_000}]}
    with server.client() as http:
        _assert_error(http.post("/v1/chat/completions", json=big), 413, contains="65536 byte limit")

        def chunks():
            for _ in range(100):
                yield b" " * 4096

        _assert_error(http.post("/v1/chat/completions", content=chunks()), 413)
        assert http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 2}).status_code == 200


def test_engine_failure_is_500_and_the_server_keeps_serving(start_server, fault_once):
    fail_prefill = fault_once("shizhen.engine.model_runner.ModelRunner.prefill", RuntimeError("simulated kernel failure"))
    server = start_server()
    with server.client() as http:
        fail_prefill.arm()
        error = _assert_error(http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 4}), 500)
        assert "simulated kernel failure" in error["message"]
        fail_prefill.arm()
        with http.stream("POST", "/v1/chat/completions", json={"messages": [USER], "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 4}).status_code == 200
    assert server.engine.restarts == 0  # a request's own failure never costs the engine process


def test_null_means_omitted_and_unknown_fields_are_logged(server, caplog):
    """OpenAI marks these fields nullable; clients (and vLLM's tests) send explicit nulls."""
    nulls = {name: None for name in ("n", "stream", "presence_penalty", "frequency_penalty", "stop", "seed",
                                      "temperature", "top_p", "max_tokens", "stream_options", "response_format",
                                      "tools", "tool_choice", "logit_bias", "top_logprobs", "logprobs")}
    with server.client() as http:
        response = http.post("/v1/chat/completions", json={"messages": [USER], **nulls, "max_completion_tokens": 2,
                                                           "response_format": {"type": "text"},
                                                           "metadata_we_do_not_know": {"a": 1}})
    assert response.status_code == 200, response.text
    assert "ignored: metadata_we_do_not_know" in caplog.text
