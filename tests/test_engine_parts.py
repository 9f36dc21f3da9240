"""The engine's plain-Python parts: text release, stop strings and sampling rules."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from shizhen.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from shizhen.engine.sampling import SamplingParams, TokenSampler


def test_detokenizer_never_splits_a_character(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "舌红苔黄，脉数。Tongue 🙂 red"
    ids = tokenizer(text)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(("</答>", "END"))
    assert matcher.feed("舌淡<") == ("舌淡", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.feed("x") == ("</x", False)
    assert matcher.feed("苔白</答") == ("苔白", False)
    assert matcher.feed(">后面") == ("", True)
    other = StopStringMatcher(("END",))
    assert other.feed("the EN") == ("the ", False)
    assert other.flush() == "EN"


def _sampler(**params) -> TokenSampler:
    return TokenSampler(SamplingParams(max_new_tokens=8, **params), torch.tensor([0, 1]), vocab_size=6)


def test_greedy_and_penalties():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0, 0.0])
    assert int(_sampler(temperature=0).sample(logits)) == 0
    # repetition penalty covers prompt tokens (0, 1): 5/3 and 4/3 drop below 3
    assert int(_sampler(temperature=0, repetition_penalty=3.0).sample(logits)) == 2
    sampler = _sampler(temperature=0, frequency_penalty=2.0)
    assert [int(sampler.sample(logits)) for _ in range(3)] == [0, 1, 0]


def test_top_k_top_p_and_seed():
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0, -5.0, -5.0])
    top_one = _sampler(temperature=1.0, top_k=1, seed=1)
    assert {int(top_one.sample(logits)) for _ in range(20)} == {0}
    nucleus = _sampler(temperature=1.0, top_p=0.5, seed=2)
    assert {int(nucleus.sample(logits)) for _ in range(50)} <= {0, 1}

    def draws(seed):
        sampler = _sampler(temperature=1.0, seed=seed)
        return [int(sampler.sample(logits)) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
