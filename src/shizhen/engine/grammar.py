"""Structured outputs in the engine: grammars compiled against the tokenizer (xgrammar), one matcher per sequence,
and the step's token mask.

A request's grammar is a `(kind, source)` pair (`parse_grammar` lists the kinds); the API process has already
checked that it parses. Compiling runs on threads (xgrammar releases the GIL) while the engine keeps stepping; identical grammars
compile once (xgrammar's cache). Each step, the rows of constrained sequences get their allowed tokens from their
matchers into a host bitmask, which is copied to the device and applied to the logits before sampling: requests with
and without grammars share the batch and the decode graph.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar

from .device_copy import to_device

def parse_grammar(kind: str, source: str) -> xgrammar.Grammar:
    """The grammar without the tokenizer: what the API process checks a request with (raises on a bad one). JSON
    is compact (no free whitespace): a model is not free to pad its answer with blank lines until max_tokens, as
    weak ones do when allowed."""
    if kind == "json_schema":
        return xgrammar.Grammar.from_json_schema(source, any_whitespace=False, strict_mode=True)
    if kind == "json_object":
        return xgrammar.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return xgrammar.Grammar.from_regex(source)
    if kind == "ebnf":
        return xgrammar.Grammar.from_ebnf(source)
    if kind == "structural_tag":
        return xgrammar.Grammar.from_structural_tag(source)
    raise ValueError(f"unknown grammar kind {kind!r}")


def grammar_error(kind: str, source: str) -> str | None:
    """Why the grammar cannot be used (xgrammar's message, without its source location), or None."""
    try:
        parse_grammar(kind, source)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with a C++ location prefix
        return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip() or type(exc).__name__
    return None


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def tool_call_grammar(tools: list[dict], tool_choice: str | dict, parallel: bool) -> str:
    """A structural tag (JSON) for answers that must call a tool (`tool_choice` "required" or a named function):
    `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` with arguments following the tool's parameters,
    as Qwen2.5 writes calls (xgrammar's Qwen format, without a reasoning block)."""
    tag = xgrammar.get_model_structural_tag("qwen_3", tools=tools, tool_choice=tool_choice, reasoning="disabled",
                                            parallel_tool_calls=parallel, max_whitespace_cnt=1)
    return tag.model_dump_json()


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int], device: torch.device):
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids) or None)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="shizhen-grammar")
        self._vocab_size = vocab_size
        self._device = device

    def compile(self, grammar: tuple[str, str]) -> Future:
        """A Future of the compiled grammar (a cache hit resolves at once)."""
        return self._threads.submit(self._compile, *grammar)

    def _compile(self, kind: str, source: str) -> xgrammar.CompiledGrammar:
        return self._compiler.compile_grammar(parse_grammar(kind, source))

    @staticmethod
    def matcher(compiled: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(compiled)

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, xgrammar.GrammarMatcher]]) -> None:
        """Mask `logits` [batch, vocab] in place: each listed row to the tokens its matcher allows next. A fresh
        host bitmask each time: the copy of the last one may still be queued."""
        indices = [row for row, _ in rows]
        bitmask = xgrammar.allocate_token_bitmask(max(indices) + 1, self._vocab_size)
        for row, matcher in rows:
            matcher.fill_next_token_bitmask(bitmask, row)
        on_device = indices if self._device.type == "cpu" else to_device(torch.tensor(indices, dtype=torch.int32),
                                                                          self._device)  # a list would sync
        xgrammar.apply_token_bitmask_inplace(logits, to_device(bitmask, self._device), vocab_size=self._vocab_size,
                                             indices=on_device)
