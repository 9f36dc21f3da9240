"""Prefill and decode of one sequence, with Qwen2.5-VL's 3-D rotary positions made explicit.

Positions are computed here rather than left to the model, whose fallback keeps `rope_deltas` as state on the
module — state that would leak between requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .loader import LoadedModel
from .prompt import PromptInputs
from .request import GenerationOutput, GenerationRequest
from .sampling import TokenSampler


class SequenceRunner:
    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded
        self._model = loaded.model

    @torch.inference_mode()
    def run(self, request: GenerationRequest, is_cancelled: Callable[[], bool]) -> Iterator[GenerationOutput]:
        """Yields one output per generated token until a stop token, a stop string, the token limit or a cancel."""
        device = self._loaded.device
        prompt = request.prompt
        params = request.sampling
        input_ids = prompt.input_ids.to(device)
        positions, rope_delta = self._prompt_positions(prompt, input_ids)
        cache = DynamicCache(config=self._model.config)
        logits = self._forward(input_ids, positions, cache, **self._vision_inputs(prompt, device))
        sampler = TokenSampler(params, input_ids[0], self._loaded.vocab_size)
        detokenizer = IncrementalDetokenizer(self._loaded.processor.tokenizer)
        stopper = StopStringMatcher(params.stop)
        stop_ids = frozenset() if params.ignore_eos else self._loaded.stop_token_ids

        for produced in range(1, params.max_new_tokens + 1):
            token = sampler.sample(logits)
            token_id = int(token)
            if token_id in stop_ids:
                yield GenerationOutput(_drain(detokenizer, stopper)[0], produced, "stop")
                return
            text, hit_stop = stopper.feed(detokenizer.push(token_id))
            if hit_stop:
                yield GenerationOutput(text, produced, "stop")
                return
            if produced == params.max_new_tokens:
                tail, hit_stop = _drain(detokenizer, stopper)
                yield GenerationOutput(text + tail, produced, "stop" if hit_stop else "length")
                return
            yield GenerationOutput(text, produced)
            if is_cancelled():
                return
            position = prompt.num_tokens + produced - 1 + rope_delta
            logits = self._forward(token.view(1, 1), position.view(1, 1, 1).expand(3, 1, 1), cache)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: DynamicCache, **vision) -> torch.Tensor:
        out = self._model(
            input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
            **vision,
        )
        return out.logits[0, -1]

    def _prompt_positions(self, prompt: PromptInputs, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, 1, prompt_len) positions and the offset text positions continue from after the prompt."""
        if prompt.image_grid_thw is None:
            positions = torch.arange(prompt.num_tokens, device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
            return positions, torch.zeros((), dtype=torch.long, device=input_ids.device)
        positions, deltas = self._model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=prompt.mm_token_type_ids.to(input_ids.device),
            image_grid_thw=prompt.image_grid_thw.to(input_ids.device),
        )
        return positions, deltas.view(()).to(input_ids.device)

    def _vision_inputs(self, prompt: PromptInputs, device: torch.device) -> dict[str, torch.Tensor]:
        if prompt.pixel_values is None:
            return {}
        return {
            "pixel_values": prompt.pixel_values.to(device, self._loaded.dtype),
            "image_grid_thw": prompt.image_grid_thw.to(device),
        }


def _drain(detokenizer: IncrementalDetokenizer, stopper: StopStringMatcher) -> tuple[str, bool]:
    """At the end of a sequence: release all held-back text, still cutting at a stop string."""
    text, hit_stop = stopper.feed(detokenizer.flush())
    return (text, True) if hit_stop else (text + stopper.flush(), False)
