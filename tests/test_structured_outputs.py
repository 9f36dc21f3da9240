"""Structured outputs through the real server and the official openai client: response_format (json_schema,
json_object), vLLM's structured_outputs (choice, regex, grammar, json) and logit_bias. The tiny checkpoint's
weights are random, so every answer that follows its grammar proves the constraint, not the model."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pytest
from conftest import image_data_url, tongue_photo
from pydantic import BaseModel, Field

USER = {"role": "user", "content": "请从中医角度解读这张舌苔，用 JSON 回答。"}


class TongueReport(BaseModel):
    """What a clinic app files: every field a closed set, so random weights cannot wander."""

    body_color: Literal["pale", "pale_red", "red", "crimson", "purple"]
    coating: Literal["thin_white", "thick_white", "yellow", "greasy", "none"]
    tooth_marks: bool
    cracks: bool
    severity: int = Field(ge=0, le=9)
    patterns: list[Literal["qi_deficiency", "damp_heat", "blood_stasis", "yin_deficiency"]] = Field(max_length=3)


def test_parse_returns_a_valid_report_for_every_seed(server):
    client = server.openai()
    for seed in range(6):
        completion = client.chat.completions.parse(model=server.settings.model_name, messages=[USER],
                                                   response_format=TongueReport, max_tokens=400, seed=seed,
                                                   temperature=1.0)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, TongueReport)
        assert TongueReport.model_validate_json(choice.message.content) == choice.message.parsed


def test_a_streamed_json_schema_answer_parses_once_joined(server):
    client = server.openai()
    stream = client.chat.completions.create(
        model=server.settings.model_name, messages=[USER], max_tokens=400, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "tongue_report", "strict": True,
                                                                "schema": TongueReport.model_json_schema()}})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    TongueReport.model_validate_json(text)


def test_json_object_answers_an_object(server):
    client = server.openai()
    # the object's keys and values are free; a bias towards the closing characters keeps random weights brief
    with server.client() as http:
        short = {str(t): 12.0 for t in http.post("/tokenize", json={"prompt": '"}0,]', "add_special_tokens": False})
                 .json()["tokens"]}
    for seed in range(3):
        completion = client.chat.completions.create(model=server.settings.model_name, messages=[USER], seed=seed,
                                                    max_tokens=1500, response_format={"type": "json_object"},
                                                    logit_bias=short)
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(completion.choices[0].message.content), dict)


@pytest.mark.parametrize("outputs, check", [
    ({"choice": ["舌淡红苔薄白", "舌红苔黄腻", "舌紫暗"]}, lambda text: text in {"舌淡红苔薄白", "舌红苔黄腻", "舌紫暗"}),
    ({"regex": r"(寒|热)证, [1-9]\d?"}, lambda text: re.fullmatch(r"(寒|热)证, [1-9]\d?", text)),
    ({"grammar": 'root ::= "证型: " ("湿热" | "气虚" | "血瘀") "。"'},
     lambda text: text in {"证型: 湿热。", "证型: 气虚。", "证型: 血瘀。"}),
    ({"json": {"type": "object", "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 5}},
               "required": ["level"]}}, lambda text: 1 <= json.loads(text)["level"] <= 5),
])
def test_vllms_structured_outputs_constrain_the_answer(server, outputs, check):
    client = server.openai()
    for seed in range(4):
        completion = client.chat.completions.create(model=server.settings.model_name, messages=[USER], seed=seed,
                                                    max_tokens=200, extra_body={"structured_outputs": outputs})
        text = completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop" and check(text), text


def test_legacy_completions_take_structured_outputs_too(server):
    completion = server.openai().completions.create(model=server.settings.model_name, prompt="舌象：", max_tokens=50,
                                                    extra_body={"structured_outputs": {"choice": ["寒", "热"]}})
    assert completion.choices[0].text in {"寒", "热"} and completion.choices[0].finish_reason == "stop"


def test_constrained_and_free_requests_share_batches_without_changing_the_free_ones(server):
    client = server.openai()

    def free():
        return client.chat.completions.create(model=server.settings.model_name, messages=[USER], max_tokens=40,
                                              temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content

    def constrained(seed):
        return client.chat.completions.parse(model=server.settings.model_name, messages=[USER], seed=seed,
                                             response_format=TongueReport, max_tokens=400).choices[0].message.parsed

    alone = free()
    with ThreadPoolExecutor(8) as pool:
        reports = [pool.submit(constrained, seed) for seed in range(5)]
        frees = [pool.submit(free) for _ in range(3)]
        assert all(isinstance(report.result(), TongueReport) for report in reports)
        assert [answer.result() for answer in frees] == [alone] * 3


def test_a_tongue_photo_gets_a_structured_report_from_vision_analyze(server):
    schema = {"type": "json_schema", "json_schema": {"name": "tongue_report", "schema": TongueReport.model_json_schema()}}
    with server.client() as http:
        analysis = http.post("/v1/vision/analyze", json={"image": image_data_url(tongue_photo()), "max_tokens": 400,
                                                         "response_format": schema})
        assert analysis.status_code == 200, analysis.text
        TongueReport.model_validate_json(analysis.json()["analysis"])
        form = http.post("/v1/vision/analyze", files={"image": ("tongue.png", _png(), "image/png")},
                         data={"response_format": json.dumps(schema), "max_tokens": "400"})
        assert form.status_code == 200, form.text
        TongueReport.model_validate_json(form.json()["analysis"])


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    tongue_photo().save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"guided_json": {"type": "object"}}, None),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"functions": [{"name": "f", "parameters": {}}]}, None),
    ({"modalities": ["text", "audio"]}, None),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
])
def test_a_constraint_that_cannot_work_is_a_400_naming_its_field(server, extra, param):
    with server.client() as http:
        response = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 5} | extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    with server.client() as http:  # and the server goes on serving
        assert http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 2}).status_code == 200


def test_the_openai_client_sees_a_bad_schema_as_its_bad_request(server):
    with pytest.raises(openai.BadRequestError) as refused:
        server.openai().chat.completions.create(
            model=server.settings.model_name, messages=[USER], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}})
    assert "objec" in refused.value.message


def test_logit_bias_moves_the_greedy_choice(server):
    client = server.openai()
    with server.client() as http:
        favourite = http.post("/tokenize", json={"prompt": "舌", "add_special_tokens": False}).json()["tokens"][0]
    completion = client.chat.completions.create(model=server.settings.model_name, messages=[USER], max_tokens=6,
                                                temperature=0, logprobs=True, logit_bias={str(favourite): 100},
                                                extra_body={"ignore_eos": True})
    tokens = [entry.bytes for entry in completion.choices[0].logprobs.content]
    with server.client() as http:
        piece = http.post("/detokenize", json={"tokens": [favourite]}).json()["prompt"]
    assert all(bytes(token) == piece.encode() for token in tokens), tokens
