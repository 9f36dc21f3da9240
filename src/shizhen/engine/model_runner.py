"""Runs the model: prefill of prompts into their slots, and batched decode steps replayed as CUDA graphs.

Decode batches are always slots [0, batch) and attend to positions [0, length); both are rounded up to captured
buckets, so each step replays one graph whose inputs are a few static buffers. Rows of free slots inside the
bucket compute garbage into their own free slot and are never read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .allocation import blocks_for
from .device_copy import to_device
from .kv_cache import KVCache
from .loader import LoadedModel
from .prompt import PromptInputs
from .text_stack import TextStack
from .vision_attention import use_packed_vision_attention

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class DecodeRow:
    slot: int
    position: int  # the fed token's rotary position (Qwen2.5-VL: text position + the prompt's rope delta)
    cache_len: int  # tokens already in the slot; the fed token's K/V goes here


def buckets(candidates: tuple[int, ...], limit: int) -> list[int]:
    return [size for size in candidates if size < limit] + [limit]


class ModelRunner:
    """Built in two steps: the runner (weights regrouped, `probe_prefill` usable for memory planning), then
    `allocate_cache` with the planned number of KV blocks, which also captures the decode graphs."""

    def __init__(self, loaded: LoadedModel, slots: int, max_len: int):
        self._loaded = loaded
        self._model = loaded.model
        self._config = config = loaded.model.model.language_model.config
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = device = loaded.device
        self.kv_bytes_per_token = KVCache.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads,
                                                          self._head_dim, loaded.dtype)
        self.kv: KVCache | None = None
        self._slots, self._max_len = slots, max_len
        self.batch_buckets = buckets(BATCH_BUCKETS, slots)
        self.length_buckets = buckets(LENGTH_BUCKETS, max_len)
        self._text = TextStack(loaded.model)
        use_packed_vision_attention(loaded.model)
        # the decode step's inputs: token, rotary position and cache length per slot
        self._inputs = torch.zeros(3, slots, dtype=torch.long, device=device)
        # positions, cache lengths and row slots travel packed in one copy from pinned host memory (a pageable or
        # strided source would make the copy wait for the step still running); two host buffers used in turn, so
        # filling one cannot overwrite the other before its copy ran
        pinned = device.type == "cuda"
        self._staging = [torch.zeros(3 * slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._staging_turn = 0
        self._packed = torch.zeros(3 * slots, dtype=torch.long, device=device)
        self._row_slots = torch.zeros(slots, dtype=torch.long, device=device)
        self._logits = torch.zeros(slots, config.vocab_size, dtype=loaded.dtype, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def _cache(self, blocks: int, slots: int, max_len: int) -> KVCache:
        config = self._config
        return KVCache(config.num_hidden_layers, blocks, slots, config.num_key_value_heads, max_len, self._head_dim,
                       self._loaded.dtype, self.device)

    @torch.inference_mode()
    def probe_prefill(self, prompt: PromptInputs) -> int:
        """Prefill `prompt` into a throwaway cache, as memory planning measures the activation peak with; returns
        the bytes that cache took (not part of the peak that matters)."""
        blocks = list(range(1, blocks_for(prompt.num_tokens) + 1))
        probe = self._cache(len(blocks) + 1, 1, prompt.num_tokens)
        self._prefill_into(probe, [(0, blocks, prompt)])
        return sum(t.numel() * t.element_size() for t in [*probe.keys, *probe.values, probe.block_tables])

    def allocate_cache(self, blocks: int, use_graphs: bool) -> None:
        self.kv = self._cache(blocks, self._slots, self._max_len)
        if use_graphs:
            self._capture_graphs()

    # --- prefill ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, admitted: list[tuple[int, list[int], PromptInputs]]) -> tuple[torch.Tensor, list[int]]:
        """Run prompts (and their images) into their slots and KV blocks — (slot, blocks, prompt) each — in one
        forward pass, right-padded to the longest. Returns each prompt's last-position logits
        [len(admitted), vocab] and rope deltas."""
        return self._prefill_into(self.kv, admitted)

    def _prefill_into(self, kv: KVCache, admitted: list[tuple[int, list[int], PromptInputs]]
                      ) -> tuple[torch.Tensor, list[int]]:
        device = self.device
        prompts = [prompt for _, _, prompt in admitted]
        tables = torch.zeros(len(admitted), kv.block_tables.shape[1], dtype=torch.long)
        for row, (_, blocks, _) in enumerate(admitted):
            tables[row, : len(blocks)] = torch.tensor(blocks)
        slots = to_device(torch.tensor([slot for slot, _, _ in admitted]), device)
        kv.block_tables[slots] = to_device(tables, device)
        longest = max(prompt.num_tokens for prompt in prompts)
        input_ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        positions = torch.arange(longest, device=device).view(1, 1, -1).repeat(3, len(prompts), 1)
        deltas = []
        for row, prompt in enumerate(prompts):
            input_ids[row, : prompt.num_tokens] = to_device(prompt.input_ids, device)[0]
            if prompt.image_grid_thw is not None:
                row_positions, delta = self._image_prompt_positions(prompt)
                positions[:, row, : prompt.num_tokens] = to_device(row_positions[:, 0].contiguous(), device)
                deltas.append(delta)
            else:
                deltas.append(0)
        last = to_device(torch.tensor([prompt.num_tokens - 1 for prompt in prompts]), device)
        return self._text.prefill(kv, input_ids, positions, slots, last, self._vision_inputs(prompts)), deltas

    def _vision_inputs(self, prompts: list[PromptInputs]) -> dict[str, torch.Tensor]:
        with_images = [prompt for prompt in prompts if prompt.pixel_values is not None]
        if not with_images:
            return {}
        device = self.device
        return {
            "pixel_values": to_device(torch.cat([p.pixel_values for p in with_images]), device).to(self._loaded.dtype),
            "image_grid_thw": to_device(torch.cat([p.image_grid_thw for p in with_images]), device),
        }

    def _image_prompt_positions(self, prompt: PromptInputs) -> tuple[torch.Tensor, int]:
        """(3, 1, prompt_len) rotary positions of a prompt with images, and the offset text positions continue from
        after it. Computed here rather than by the model, whose fallback keeps `rope_deltas` as state shared by all
        requests, and on the host's copy of the prompt: reading the offset back from the GPU would wait for every
        step queued before this prefill."""
        positions, deltas = self._model.model.get_rope_index(
            prompt.input_ids, mm_token_type_ids=prompt.mm_token_type_ids, image_grid_thw=prompt.image_grid_thw)
        return positions, int(deltas.view(-1)[0])

    def release(self, slot: int) -> None:
        self.kv.clear_table(slot)

    def extend_block_tables(self, grown: list[tuple[int, int, int]]) -> None:
        """(slot, column, block) each: sequences that grew into one more block. Queued on the device; no wait."""
        slots, columns, blocks = to_device(torch.tensor(grown, dtype=torch.long).T.contiguous(), self.device)
        self.kv.block_tables[slots, columns] = blocks

    # --- decode ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, rows: list[DecodeRow], next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed each row's slot its token from `next_tokens` (per slot, on the device: the last sampled ones, so no
        host round trip). Returns logits [len(rows), vocab] in the order of `rows`, and the rows' slots as a device
        tensor. Nothing here waits for the GPU."""
        batch = _bucket(self.batch_buckets, max(row.slot for row in rows) + 1)
        length = _bucket(self.length_buckets, max(row.cache_len for row in rows) + 1)
        positions, cache_lens = [0] * batch, [0] * batch  # free slots inside the bucket: position 0
        for row in rows:
            positions[row.slot], cache_lens[row.slot] = row.position, row.cache_len
        values = positions + cache_lens + [row.slot for row in rows]
        staging = self._staging[self._staging_turn][: len(values)]
        self._staging_turn ^= 1
        staging.copy_(torch.tensor(values, dtype=torch.long))
        packed = self._packed[: len(values)]
        packed.copy_(staging, non_blocking=staging.is_pinned())
        self._inputs[1:, :batch].copy_(packed[: 2 * batch].view(2, batch))
        self._row_slots[: len(rows)].copy_(packed[2 * batch :])
        self._inputs[0, :batch].copy_(next_tokens[:batch])
        graph = self._graphs.get((batch, length))
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(batch, length)
        row_slots = self._row_slots[: len(rows)]
        return self._logits[row_slots], row_slots

    def _decode_step(self, batch: int, length: int) -> None:
        tokens, positions, cache_lens = self._inputs[0, :batch], self._inputs[1, :batch], self._inputs[2, :batch]
        self._logits[:batch].copy_(self._text.decode(self.kv, tokens, positions, cache_lens, length))

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """One graph per (batch, length) bucket, largest first, all sharing one memory pool."""
        started = time.perf_counter()
        pool = None
        for batch in reversed(self.batch_buckets):
            for length in reversed(self.length_buckets):
                self._decode_step(batch, length)  # warm-up: lazy inits and autotuning happen outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_step(batch, length)
                pool = graph.pool()
                self._graphs[(batch, length)] = graph
        torch.cuda.synchronize()
        self._inputs.zero_()
        log.info("captured %d decode graphs (batch %s x length %s) in %.1f s", len(self._graphs),
                 self.batch_buckets, self.length_buckets, time.perf_counter() - started)


def _bucket(sizes: list[int], needed: int) -> int:
    return next(size for size in sizes if size >= needed)
