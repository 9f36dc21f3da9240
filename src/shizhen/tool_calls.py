"""Tool calls as Qwen2.5 writes them (the "hermes" format): tools in the system prompt, each call as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` in the answer, results back as `<tool_response>`.

ShizhenGPT's checkpoints ship the Qwen2-VL chat template, which knows no tools, so the conversation is rendered here
into plain turns with exactly the text Qwen2.5's own template writes for them (system block, assistant calls, tool
results merged into one user turn). The answer is parsed back into OpenAI's `tool_calls`, whole (`parse`) or while
it streams (`StreamingToolCalls`): text around the calls stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
DEFAULT_SYSTEM = "You are a helpful assistant."  # what the checkpoint's template says when no system prompt is sent

_TOOLS_BLOCK = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>{signatures}\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_HEAD_WAIT_CHARS = 160  # a call whose name and "arguments" key have not come after this much text is not a call


def tools_system_text(system: str | None, tools: list[dict]) -> str:
    """The system turn's text with the tools' signatures, as Qwen2.5's template writes it."""
    signatures = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (DEFAULT_SYSTEM if system is None else system) + _TOOLS_BLOCK.format(signatures=signatures)


def call_text(name: str, arguments: object) -> str:
    """One call as the model writes it (an assistant turn in the history carries its calls this way)."""
    return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n{CALL_CLOSE}'


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolUse:
    """The tools an answer may call, as the answer is read back."""

    names: frozenset[str]
    named: bool = False  # tool_choice named a function: OpenAI then finishes with "stop", not "tool_calls"

    def finish_reason(self, engine_reason: str, called: bool) -> str:
        return "tool_calls" if called and engine_reason == "stop" and not self.named else engine_reason


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as OpenAI gives it


def _parse_call(body: str, names: frozenset[str]) -> ParsedCall | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments", {}), dict):
        return None
    return ParsedCall(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False))


def parse(text: str, names: frozenset[str]) -> tuple[str | None, list[ParsedCall]]:
    """The answer's content (text outside the calls; None if nothing is left) and its calls of known tools. A call
    that does not parse stays in the content, as the model wrote it."""
    calls, kept, end = [], [], 0
    for match in _CALL.finditer(text):
        call = _parse_call(match.group(1).strip(), names)
        if call is None:
            continue
        calls.append(call)
        kept.append(text[end : match.start()])
        end = match.end()
    if not calls:
        return text, []
    content = ("".join(kept) + text[end:]).strip()
    return content or None, calls


@dataclass
class CallDelta:
    """A piece of a streamed call: the first of each call has its id and name, the rest argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamingToolCalls:
    """Splits streamed text into content and call deltas. Text that may be the start of `<tool_call>` is held back
    until it is clear; inside a call, the name goes out as soon as it is known and then the arguments as they
    grow, all but a trailing `}` that may close the call. The concatenated arguments of a call are its JSON."""

    names: frozenset[str]
    calls: int = 0  # calls begun (their name was sent)
    _buffer: str = ""
    _in_call: bool = False
    _after_call: bool = False
    _sent_arguments: int = 0  # of the current call's argument text
    _arguments_at: int | None = None  # where the current call's arguments start in the buffer

    def push(self, text: str) -> tuple[str, list[CallDelta]]:
        """New text → (content to send now, call deltas to send now)."""
        self._buffer += text
        content: list[str] = []
        deltas: list[CallDelta] = []
        while True:
            if not self._in_call:
                if self._after_call:  # the newline(s) after a call belong to it
                    self._buffer = self._buffer.lstrip("\n")
                    self._after_call = not self._buffer
                start = self._buffer.find(CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buffer, CALL_OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_OPEN) :]
                self._in_call, self._arguments_at, self._sent_arguments = True, None, 0
            elif not self._advance_call(content, deltas):
                break
        return "".join(content), deltas

    def _advance_call(self, content: list[str], deltas: list[CallDelta]) -> bool:
        """Emit what the buffered call allows; True when the call closed or turned out not to be one (more may
        follow in the buffer)."""
        if self._arguments_at is None:
            head = _CALL_HEAD.match(self._buffer)
            if head is None and CALL_CLOSE not in self._buffer and _could_be_head(self._buffer):
                return False  # wait for more
            if head is None or head.group(1) not in self.names:  # not a call of a known tool: content
                content.append(CALL_OPEN)
                self._in_call = False
                return True
            self._arguments_at = head.end()
            deltas.append(CallDelta(self.calls, id=new_call_id(), name=head.group(1)))
            self.calls += 1
        close = self._buffer.find(CALL_CLOSE, self._arguments_at)
        if close >= 0:
            arguments = self._buffer[self._arguments_at : close].rstrip().removesuffix("}").rstrip()
        else:  # hold back what may be the call's own closing brace and the start of `</tool_call>`
            arguments = self._buffer[self._arguments_at :]
            arguments = arguments[: len(arguments) - _partial_suffix(arguments, CALL_CLOSE)].rstrip()
            arguments = arguments[:-1] if arguments.endswith("}") else arguments
        if len(arguments) > self._sent_arguments:
            deltas.append(CallDelta(self.calls - 1, arguments=arguments[self._sent_arguments :]))
            self._sent_arguments = len(arguments)
        if close < 0:
            return False
        self._buffer = self._buffer[close + len(CALL_CLOSE) :]
        self._in_call, self._after_call = False, True
        return True

    def flush(self) -> str:
        """At the end: text still held back that turned out to be content (a call whose name went out keeps its
        unfinished arguments)."""
        if not self._in_call:
            held = self._buffer
        else:
            held = CALL_OPEN + self._buffer if self._arguments_at is None else ""
        self._buffer = ""
        return held


def _partial_suffix(text: str, token: str) -> int:
    """How many characters at the end of `text` could begin `token`."""
    for size in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-size:]):
            return size
    return 0


def _could_be_head(text: str) -> bool:
    """Whether the text after `<tool_call>` may still become `{"name": "...", "arguments": ` (a head is short)."""
    return len(text) < _HEAD_WAIT_CHARS and text.lstrip()[:1] in ("", "{")
