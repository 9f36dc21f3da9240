"""Per-request sampling parameters, and the sampler that applies them to a whole decode batch at once.

Every per-request setting lives in a per-slot tensor, so one step samples every row with a handful of kernels and
no host round trip. Randomness is a counter-based hash of (seed, step, token id): the same seed and input give
the same output whatever else is in the batch, with no generator objects to keep per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .device_copy import to_device


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # stop tokens cannot be sampled (nor stop strings end the text) before this many
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # the request's own, besides the checkpoint's end-of-turn tokens
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n likeliest (0 to 20)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)
    grammar: tuple[str, str] | None = None  # (kind, source): the output follows it (grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0


@dataclass(frozen=True)
class SlotHistory:
    """What a slot's sampling state starts from: the request's parameters and seed, its prompt, and the tokens it
    already produced (a preempted sequence coming back: they count for the penalties and the noise's step)."""

    slot: int
    params: SamplingParams
    seed: int
    prompt_ids: torch.Tensor
    output_ids: list[int]


_RELEASED = SamplingParams(max_new_tokens=1, temperature=0.0)

# splitmix64 constants as signed 64-bit integers (torch has no unsigned 64-bit arithmetic)
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) for every (row, token), a pure function of (seed, step, token id). 23 bits, so the largest value,
    1 - 2^-24, stays below 1 in float32: at 1.0 the Gumbel term is +inf, which picks that token whatever its
    probability, and a masked token (-inf) becomes NaN, which argmax picks too."""
    token_ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = seeds[:, None] * _GOLDEN + steps[:, None] * _MIX1 + token_ids[None, :] * _MIX2
    x = (x ^ (x >> 31)) * _MIX1
    x = (x ^ (x >> 29)) * _MIX2
    x = x ^ (x >> 32)
    return ((x & 0x7FFFFF).float() + 0.5) / float(1 << 23)


class BatchSampler:
    """Sampling state for every slot: parameters, output-token counts for the penalties, and the seen mask that
    repetition_penalty (transformers' semantics) applies to prompt and output tokens alike."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self._device = device
        # per-slot parameters, two tables so that admitting requests is two copies
        self._floats = torch.zeros(slots, 6, dtype=torch.float32, device=device)
        self._ints = torch.zeros(slots, 3, dtype=torch.int64, device=device)
        (self._temperature, self._top_p, self._repetition, self._presence, self._frequency,
         self._min_p) = self._floats.unbind(1)
        self._top_k, self._seed, self._step = self._ints.unbind(1)
        self._counts = torch.zeros(slots, vocab_size, dtype=torch.float32, device=device)
        self._seen = torch.zeros(slots, vocab_size, dtype=torch.bool, device=device)
        self._params: dict[int, SamplingParams] = {}

    def admit(self, admissions: list[SlotHistory]) -> torch.Tensor:
        """Set up slots for admitted requests. Returns the slots as a device tensor. Queued on the device like a
        kernel; nothing here waits for the GPU."""
        rows = to_device(torch.tensor([entry.slot for entry in admissions]), self._device)
        floats, ints = [], []
        for entry in admissions:
            params = entry.params
            self._params[entry.slot] = params
            floats.append([params.temperature, params.top_p, params.repetition_penalty, params.presence_penalty,
                           params.frequency_penalty, params.min_p])
            ints.append([params.top_k if params.top_k > 0 else self.vocab_size, entry.seed, len(entry.output_ids)])
        self._floats.index_copy_(0, rows, to_device(torch.tensor(floats, dtype=torch.float32), self._device))
        self._ints.index_copy_(0, rows, to_device(torch.tensor(ints), self._device))
        self._counts.index_fill_(0, rows, 0.0)
        self._seen.index_fill_(0, rows, False)
        seen_slots, seen_ids = self._per_slot([(entry.slot, entry.prompt_ids.tolist() + entry.output_ids)
                                               for entry in admissions])
        self._seen.index_put_((seen_slots, seen_ids), torch.ones_like(seen_ids, dtype=torch.bool))
        if any(entry.output_ids for entry in admissions):
            out_slots, out_ids = self._per_slot([(entry.slot, entry.output_ids) for entry in admissions])
            self._counts.index_put_((out_slots, out_ids), torch.ones_like(out_ids, dtype=torch.float32),
                                    accumulate=True)
        return rows

    def _per_slot(self, token_lists: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, token ids) pairs → two flat device index tensors, one copy each."""
        slots = [slot for slot, ids in token_lists for _ in ids]
        ids = [token for _, token_ids in token_lists for token in token_ids]
        return (to_device(torch.tensor(slots, dtype=torch.long), self._device),
                to_device(torch.tensor(ids, dtype=torch.long), self._device))

    def release(self, slot: int) -> None:
        self._params.pop(slot, None)

    def sample(self, logits: torch.Tensor, slots: list[int], rows: torch.Tensor,
               banned: list[tuple[int, int]] = (),
               constrain: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """logits [rows, ≥vocab] for `slots` (in that order; `rows`: the same on the device) → next token per row,
        on the device, without waiting for the GPU. `banned`: (row, token id) pairs that cannot be drawn (stop
        tokens before min_tokens); `constrain` masks the float logits in place (grammars)."""
        # a slot released since its step was planned (its sequence ended while the host collected) samples greedily
        # for nobody: its token is dropped
        params = [self._params.get(slot, _RELEASED) for slot in slots]
        logits = logits[:, : self.vocab_size].to(torch.float32, copy=constrain is not None)  # logprobs read them
        if biases := [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]:
            bias_rows, bias_ids, bias_values = zip(*biases)
            bias_at = to_device(torch.tensor([bias_rows, bias_ids]), self._device)
            logits = logits.index_put((bias_at[0], bias_at[1]), to_device(torch.tensor(bias_values), self._device),
                                      accumulate=True)
        if banned:
            banned_rows, banned_ids = to_device(torch.tensor(banned, dtype=torch.long).T.contiguous(), self._device)
            logits = logits.index_put((banned_rows, banned_ids), torch.tensor(float("-inf"), device=self._device))
        if constrain is not None:
            constrain(logits)
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = self._penalised(logits, rows)
        tokens = torch.argmax(logits, dim=-1)
        if not all(p.greedy for p in params):
            temperature = self._temperature[rows].clamp_min(1e-5)[:, None]
            scaled = logits / temperature
            if any(p.truncates for p in params):
                scaled = self._truncated(scaled, rows)
            noise = _uniform_noise(self._seed[rows], self._step[rows], self.vocab_size)
            sampled = torch.argmax(scaled - torch.log(-torch.log(noise)), dim=-1)  # Gumbel-max: a draw from softmax
            tokens = torch.where(self._temperature[rows] == 0, tokens, sampled)
        self._counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
        self._seen.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))
        self._step[rows] += 1
        return tokens

    def token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
        """[rows, 1 + 2 * top] on the device: each drawn token's log-probability under the model's own
        distribution (before penalties, temperature and truncation, as vLLM reports by default), then the `top`
        likeliest token ids (as floats: exact below 2**24) and their log-probabilities."""
        logprobs = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        drawn = logprobs.gather(1, tokens[:, None])
        if not top:
            return drawn
        values, ids = logprobs.topk(top, dim=-1)
        return torch.cat([drawn, ids.float(), values], dim=1)

    def _penalised(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        repetition = self._repetition[rows][:, None]
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(self._seen[rows], penalised, logits)
        counts = self._counts[rows]
        return logits - self._frequency[rows][:, None] * counts - self._presence[rows][:, None] * (counts > 0).float()

    def _truncated(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Min-p, then top-k then top-p (nucleus), per row; the best token always survives."""
        probs = torch.softmax(logits, dim=-1)
        least = self._min_p[rows][:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < least, float("-inf"))
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop = rank >= self._top_k[rows][:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) >= self._top_p[rows][:, None]
        drop[:, 0] = False
        mask = torch.zeros_like(drop).scatter(1, order, drop)
        return logits.masked_fill(mask, float("-inf"))
