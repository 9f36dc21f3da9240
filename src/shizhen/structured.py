"""What a request asks its answer to follow — response_format, vLLM's structured_outputs, a forced tool call — as
the engine's grammar, checked before anything reaches the engine (a bad schema, regex or grammar is a 400 naming
the field). Checks run on the prompt threads, never on the event loop, and each distinct grammar is checked once.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from concurrent.futures import Executor

from .engine.grammar import choice_grammar, grammar_error, tool_call_grammar
from .errors import InvalidRequest
from .protocol import ChatCompletionRequest, GenerationRequestFields, NamedToolChoice

CHECKED_KEPT = 256  # verdicts remembered (clients resend the same schema with every request)


def requested_grammar(body: GenerationRequestFields) -> tuple[str, str, str] | None:
    """(kind, source, the field it came from), or None for a free answer."""
    response_format, outputs = body.response_format, body.structured_outputs
    if response_format is not None and response_format.type == "json_object":
        return "json_object", "", "response_format"
    if response_format is not None and response_format.type == "json_schema":
        return "json_schema", json.dumps(response_format.json_schema.json_schema), "response_format.json_schema"
    if outputs is not None:
        if outputs.json_ is not None:
            schema = outputs.json_ if isinstance(outputs.json_, str) else json.dumps(outputs.json_)
            return "json_schema", schema, "structured_outputs.json"
        if outputs.regex is not None:
            return "regex", outputs.regex, "structured_outputs.regex"
        if outputs.choice is not None:
            return "ebnf", choice_grammar(outputs.choice), "structured_outputs.choice"
        if outputs.grammar is not None:
            return "ebnf", outputs.grammar, "structured_outputs.grammar"
        if outputs.json_object:
            return "json_object", "", "structured_outputs.json_object"
        return "structural_tag", outputs.structural_tag, "structured_outputs.structural_tag"
    if isinstance(body, ChatCompletionRequest) and (body.tool_choice == "required"
                                                    or isinstance(body.tool_choice, NamedToolChoice)):
        choice = body.tool_choice if body.tool_choice == "required" else body.tool_choice.model_dump()
        tools = [tool.model_dump() for tool in body.tools]
        return "structural_tag", tool_call_grammar(tools, choice, body.parallel_tool_calls), "tools"
    return None


class GrammarChecks:
    def __init__(self, threads: Executor):
        self._threads = threads
        self._verdicts: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    async def grammar_for(self, body: GenerationRequestFields) -> tuple[str, str] | None:
        """The engine's (kind, source) for this request, or None; raises InvalidRequest for a grammar that does
        not parse."""
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(self._threads, requested_grammar, body)
        except ValueError as exc:  # a tool's parameters xgrammar cannot read
            raise InvalidRequest(f"the tools cannot constrain the answer: {exc}", param="tools",
                                 code="invalid_grammar") from None
        if found is None:
            return None
        kind, source, param = found
        key = (kind, source)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            error = self._verdicts[key]
        else:
            error = self._verdicts[key] = await loop.run_in_executor(self._threads, grammar_error, kind, source)
            if len(self._verdicts) > CHECKED_KEPT:
                self._verdicts.popitem(last=False)
        if error is not None:
            raise InvalidRequest(f"{param} cannot constrain the answer: {error}", param=param, code="invalid_grammar")
        return key
