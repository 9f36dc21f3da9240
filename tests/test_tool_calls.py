"""Tool calls as Qwen2.5 makes them, through the real server and the official openai client: the prompt the tools
and the call history render to, forced calls constrained by a grammar (random weights still call validly), calls
parsed whole and while streaming, and the refusals."""

from __future__ import annotations

import json
import random

import pytest

from pydantic import BaseModel

from shizhen.tool_calls import StreamingToolCalls, call_text, parse

USER = {"role": "user", "content": "舌红苔黄腻，请记录并推荐方剂。"}

RECORD = {"type": "function", "function": {
    "name": "record_tongue",
    "description": "File the tongue findings in the patient's record",
    "parameters": {"type": "object", "properties": {
        "body_color": {"type": "string", "enum": ["pale", "red", "purple"]},
        "coating": {"type": "string", "enum": ["thin_white", "yellow", "greasy"]},
        "follow_up_days": {"type": "integer", "minimum": 1, "maximum": 30},
    }, "required": ["body_color", "coating", "follow_up_days"], "additionalProperties": False},
}}
LOOKUP = {"type": "function", "function": {
    "name": "lookup_formula", "description": "Find a classical formula by name",
    "parameters": {"type": "object", "properties": {"name": {"type": "string", "enum": ["四君子汤", "六味地黄丸"]}},
                   "required": ["name"]},
}}


class Findings(BaseModel):
    body_color: str
    coating: str
    follow_up_days: int


def _valid_record(arguments: str) -> Findings:
    findings = Findings.model_validate_json(arguments)
    assert findings.body_color in {"pale", "red", "purple"} and findings.coating in {"thin_white", "yellow", "greasy"}
    assert 1 <= findings.follow_up_days <= 30
    return findings


def test_the_prompt_carries_the_tools_calls_and_results_as_qwen_writes_them(server):
    history = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "record_tongue", "arguments": '{"body_color": "red", "coating": "黄"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "lookup_formula", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"saved": true}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "四君子汤"},
    ]
    with server.client() as http:
        tokens = http.post("/tokenize", json={"messages": history, "tools": [RECORD, LOOKUP]}).json()["tokens"]
        prompt = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    signatures = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in (RECORD, LOOKUP))
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        f"{signatures}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        f"<|im_start|>user\n{USER['content']}<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "record_tongue", "arguments": {"body_color": "red", '
        '"coating": "黄"}}\n</tool_call>\n<tool_call>\n{"name": "lookup_formula", "arguments": {}}\n</tool_call>'
        "<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"saved": true}\n</tool_response>\n<tool_response>\n四君子汤\n'
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_a_named_tool_choice_always_gets_a_valid_call(server):
    client = server.openai()
    for seed in range(4):
        completion = client.chat.completions.create(
            model=server.settings.model_name, messages=[USER], tools=[RECORD, LOOKUP], seed=seed, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "record_tongue"}})
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"  # OpenAI's finish for a named function
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "record_tongue"
        _valid_record(call.function.arguments)


def test_required_calls_one_of_the_tools_and_finishes_with_tool_calls(server):
    client = server.openai()
    for seed in range(4):
        completion = client.chat.completions.create(
            model=server.settings.model_name, messages=[USER], tools=[RECORD, LOOKUP], seed=seed, max_tokens=200,
            tool_choice="required", parallel_tool_calls=False)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name in {"record_tongue", "lookup_formula"}
        json.loads(call.function.arguments)


def test_a_streamed_call_sends_id_and_name_first_then_its_arguments(server):
    stream = server.openai().chat.completions.create(
        model=server.settings.model_name, messages=[USER], tools=[RECORD], seed=1, max_tokens=200, stream=True,
        tool_choice={"type": "function", "function": {"name": "record_tongue"}})
    deltas = [chunk.choices[0] for chunk in stream if chunk.choices]
    calls = [call for choice in deltas for call in choice.delta.tool_calls or ()]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "record_tongue"
    assert rest and all(call.index == 0 and call.id is None and call.function.name is None for call in rest)
    _valid_record("".join(call.function.arguments or "" for call in calls))
    assert not any(choice.delta.content for choice in deltas)
    assert deltas[-1].finish_reason == "stop"


def test_with_tools_on_auto_a_plain_answer_stays_content(server):
    completion = server.openai().chat.completions.create(model=server.settings.model_name, messages=[USER],
                                                         tools=[RECORD], max_tokens=20, seed=0)
    choice = completion.choices[0]
    assert choice.message.tool_calls == [] and choice.finish_reason in {"stop", "length"}
    assert isinstance(choice.message.content, str)


def test_calls_in_an_answer_parse_whole_and_streamed_alike():
    names = frozenset({"record_tongue", "lookup_formula"})
    text = ("让我记录一下。\n" + call_text("record_tongue", {"body_color": "red", "note": "舌尖红 <b>"}) + "\n"
            + call_text("lookup_formula", {"name": "四君子汤"}) + "\n")
    content, calls = parse(text, names)
    assert content == "让我记录一下。"
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("record_tongue", {"body_color": "red", "note": "舌尖红 <b>"}), ("lookup_formula", {"name": "四君子汤"})]
    for trial in range(30):  # any split of the text into streamed pieces gives the same content and calls
        streamer, streamed, arguments, ids = StreamingToolCalls(names), "", {}, {}
        pieces = _random_pieces(text, random.Random(trial))
        for piece in pieces:
            new_text, deltas = streamer.push(piece)
            streamed += new_text
            for delta in deltas:
                if delta.id:
                    ids[delta.index] = delta.name
                arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
        streamed += streamer.flush()
        assert streamed.strip() == content
        assert [(ids[i], json.loads(arguments[i])) for i in sorted(ids)] == \
            [(call.name, json.loads(call.arguments)) for call in calls]


@pytest.mark.parametrize("text", [
    "no calls, only <tool text and <tool_cal",
    call_text("unknown_tool", {"a": 1}),
    "<tool_call>\nnot json\n</tool_call> after",
])
def test_what_is_not_a_call_of_a_known_tool_stays_content(text):
    names = frozenset({"record_tongue"})
    assert parse(text, names) == (text, [])
    streamer = StreamingToolCalls(names)
    streamed = "".join(streamer.push(piece)[0] for piece in _random_pieces(text, random.Random(0)))
    assert streamed + streamer.flush() == text and streamer.calls == 0


def _random_pieces(text: str, rng: random.Random) -> list[str]:
    pieces, at = [], 0
    while at < len(text):
        size = rng.randint(1, 9)
        pieces.append(text[at : at + size])
        at += size
    return pieces


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [RECORD]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [RECORD, RECORD]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [RECORD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
      "tool_choice": "required"}, "tools"),
    ({"messages": [USER, {"role": "tool", "tool_call_id": "call_1"}]}, "messages[1]"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0]"),
])
def test_tool_requests_that_cannot_work_are_400s(server, body, param):
    with server.client() as http:
        response = http.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 5} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param), response.json()
