"""Per-request sampling parameters and the token sampler that applies them to one row of logits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenSampler:
    """Turns logits into the next token for one sequence, following OpenAI's and transformers' semantics.

    repetition_penalty (transformers) covers prompt and output tokens; presence/frequency penalties (OpenAI) cover
    output tokens only. A request's seed drives its own generator, so the same seed and input give the same output
    whatever else the server is doing.
    """

    params: SamplingParams
    prompt_ids: torch.Tensor  # (prompt_len,) on the model's device
    vocab_size: int
    _output_counts: torch.Tensor = field(init=False)
    _seen: torch.Tensor = field(init=False)
    _generator: torch.Generator | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        device = self.prompt_ids.device
        self._output_counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=device)
        self._seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        self._seen[self.prompt_ids] = True
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (vocab,) → a 0-dim token tensor (still on the device)."""
        logits = self._penalised(logits[: self.vocab_size].float())
        if self.params.greedy:
            token = torch.argmax(logits)
        else:
            probs = torch.softmax(self._truncated(logits / self.params.temperature), dim=-1)
            token = torch.multinomial(probs, 1, generator=self._generator)[0]
        self._output_counts[token] += 1
        self._seen[token] = True
        return token

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self._seen, penalised, logits)
        if p.frequency_penalty or p.presence_penalty:
            logits = logits - p.frequency_penalty * self._output_counts
            logits = logits - p.presence_penalty * (self._output_counts > 0).float()
        return logits

    def _truncated(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.top_k > 0 and p.top_k < logits.numel():
            kth_best = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= p.top_p  # always keeps the best token
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits
