"""Runs the model: prefill of prompts into their slots, and batched decode steps replayed as CUDA graphs.

Decode batches are always slots [0, batch) and attend to positions [0, length); both are rounded up to captured
buckets, so each step replays one graph whose inputs are a few static buffers. Rows of free slots inside the
bucket compute garbage into their own free slot and are never read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch.nn.attention import sdpa_kernel

from .allocation import blocks_for
from .device_copy import to_device
from .image_encodings import ImageEncodings
from .kv_cache import KVCache
from .loader import LoadedModel
from .prompt import PromptInputs
from .text_stack import PREFILL_ATTENTION, DecodeRows, PackedChunks, TextStack
from .vision_attention import use_packed_vision_attention

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LENGTH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class DecodeRow:
    slot: int
    position: int  # the fed token's rotary position (Qwen2.5-VL: text position + the prompt's rope delta)
    cache_len: int  # tokens already in the slot; the fed token's K/V goes here


@dataclass(frozen=True)
class PrefillRow:
    slot: int
    blocks: list[int]  # the slot's block table
    prompt: PromptInputs  # what the sequence prefills (its prompt, and after a preemption what it produced)
    start: int  # this chunk: positions [start, end) of `prompt`; those before are in the cache already
    end: int


def buckets(candidates: tuple[int, ...], limit: int) -> list[int]:
    return [size for size in candidates if size < limit] + [limit]


class ModelRunner:
    """Built in two steps: the runner (weights regrouped, `probe_prefill` usable for memory planning), then
    `allocate_cache` with the planned number of KV blocks, which also captures the decode graphs."""

    def __init__(self, loaded: LoadedModel, slots: int, max_len: int, image_cache_tokens: int = 0):
        self._loaded = loaded
        self._model = loaded.model
        self._config = config = loaded.model.model.language_model.config
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = device = loaded.device
        self.kv_bytes_per_token = KVCache.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads,
                                                          self._head_dim, loaded.dtype)
        self.kv: KVCache | None = None
        self.image_encodings = ImageEncodings(image_cache_tokens)
        # what the image encodings may take at most (memory planning leaves it out of the KV cache)
        self.image_cache_bytes = image_cache_tokens * config.hidden_size * torch.finfo(loaded.dtype).bits // 8
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
        """Prefill `prompt` into a throwaway cache, as memory planning measures the activation peak with (its
        images all through the vision tower, none from the cache); returns the bytes that cache took (not part of
        the peak that matters)."""
        blocks = list(range(1, blocks_for(prompt.num_tokens) + 1))
        probe = self._cache(len(blocks) + 1, 1, prompt.num_tokens)
        self._prefill_into(probe, [PrefillRow(0, blocks, prompt, 0, prompt.num_tokens)], ImageEncodings(0))
        return sum(t.numel() * t.element_size() for t in [*probe.keys, *probe.values, probe.block_tables])

    def allocate_cache(self, blocks: int, use_graphs: bool) -> None:
        self.kv = self._cache(blocks, self._slots, self._max_len)
        if use_graphs:
            self._capture_graphs()

    # --- prefill ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: list[PrefillRow]) -> tuple[torch.Tensor, list[int]]:
        """Run prompt chunks (and the images their tokens hold) into their slots' KV blocks in one forward pass,
        packed without padding; a chunk attends to its prompt's positions before it, already in the cache.
        Returns the last-position logits [final rows, vocab] and rope deltas of the rows that end their prompt;
        those rows' slots get their block tables, so the next decode step includes them."""
        return self._prefill_into(self.kv, rows, self.image_encodings)

    @torch.inference_mode()
    def prefill_and_decode(self, decode_rows: list[DecodeRow], next_tokens: torch.Tensor, prefill_rows: list[PrefillRow]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """A decode step and prompt chunks in one forward pass, so the decoding sequences wait for no separate
        prefill step: every weight is read once for both. Eager (its shapes vary with the chunks). Returns what
        `decode` and `prefill` return: decode logits in the order of `decode_rows` and their slots on the device,
        then the final chunks' logits and rope deltas."""
        slots, positions, cache_lens = to_device(torch.tensor(
            [[row.slot, row.position, row.cache_len] for row in decode_rows]).T.contiguous(), self.device)
        decode = DecodeRows(tokens=next_tokens[slots], positions=positions, cache_lens=cache_lens,
                            tables=self.kv.block_tables[slots],
                            length=max(row.cache_len for row in decode_rows) + 1)
        logits, deltas = self._prefill_into(self.kv, prefill_rows, self.image_encodings, decode)
        return logits[: len(decode_rows)], slots, logits[len(decode_rows) :], deltas

    def _prefill_into(self, kv: KVCache, rows: list[PrefillRow], encodings: ImageEncodings,
                      decode: DecodeRows | None = None) -> tuple[torch.Tensor, list[int]]:
        chunks, final = self._pack(kv, rows, encodings)
        logits = self._text.prefill(kv, chunks, decode)
        self._join_decode(kv, rows, final, chunks)
        return logits, [delta for _, delta in final]

    def _pack(self, kv: KVCache, rows: list[PrefillRow], encodings: ImageEncodings
              ) -> tuple[PackedChunks, list[tuple[int, int]]]:
        """The rows' chunks end to end on the device, and (row, rope delta) of each row that ends its prompt."""
        device = self.device
        lengths = [row.end - row.start for row in rows]
        offsets = [0, *accumulate(lengths)][:-1]
        tables = torch.zeros(len(rows), kv.block_tables.shape[1], dtype=torch.long)
        positions = torch.empty(3, sum(lengths), dtype=torch.long)
        final = []
        for index, (row, offset, length) in enumerate(zip(rows, offsets, lengths, strict=True)):
            tables[index, : len(row.blocks)] = torch.tensor(row.blocks)
            if row.prompt.image_grid_thw is not None:
                row_positions, delta = self._image_prompt_positions(row.prompt)
                positions[:, offset : offset + length] = row_positions[:, 0, row.start : row.end]
            else:
                positions[:, offset : offset + length] = torch.arange(row.start, row.end)
                delta = 0
            if row.end == row.prompt.num_tokens:
                final.append((index, delta))
        chunks = PackedChunks(
            input_ids=to_device(torch.cat([row.prompt.input_ids[0, row.start : row.end] for row in rows]), device),
            positions=to_device(positions, device),
            tables=to_device(tables, device),
            token_rows=to_device(torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths)), device),
            token_positions=to_device(torch.cat([torch.arange(row.start, row.end) for row in rows]), device),
            spans=[(offset, row.start, row.end) for row, offset in zip(rows, offsets, strict=True)],
            last=to_device(torch.tensor([offsets[i] + lengths[i] - 1 for i, _ in final], dtype=torch.long), device),
            images=self._image_embeddings(rows, encodings))
        return chunks, final

    def _join_decode(self, kv: KVCache, rows: list[PrefillRow], final: list[tuple[int, int]],
                     chunks: PackedChunks) -> None:
        """Rows whose prompt is complete get their block tables in `kv`: decode steps from now on include them
        (until then a slot's row is block 0's, so a graph's padding rows write nothing of theirs)."""
        if final:  # indices copied to the device first: indexing with a list would copy it, waiting for the GPU
            indices = to_device(torch.tensor([[rows[i].slot, i] for i, _ in final]).T.contiguous(), self.device)
            kv.block_tables[indices[0]] = chunks.tables[indices[1]]

    def _image_embeddings(self, rows: list[PrefillRow], encodings: ImageEncodings) -> torch.Tensor | None:
        """The vision tower's output for the image tokens inside the rows' chunks, in their order; images not in
        `encodings` go through the tower (together) and are kept there."""
        pieces, encoded, to_encode = [], {}, {}
        for row in rows:
            prompt = row.prompt
            patch_starts = [0, *accumulate(prompt.image_patches())]
            for image, ((first, end), image_hash) in enumerate(zip(prompt.image_spans(), prompt.image_hashes,
                                                                   strict=True)):
                if first >= row.end or end <= row.start:
                    continue
                pieces.append((image_hash, max(first, row.start) - first, min(end, row.end) - first))
                if image_hash not in encoded and image_hash not in to_encode:
                    if (cached := encodings.get(image_hash)) is not None:
                        encoded[image_hash] = cached
                    else:
                        to_encode[image_hash] = (prompt.pixel_values[patch_starts[image] : patch_starts[image + 1]],
                                                 prompt.image_grid_thw[image : image + 1])
        if not pieces:
            return None
        if to_encode:
            device = self.device
            pixels, grids = zip(*to_encode.values(), strict=True)
            with sdpa_kernel(PREFILL_ATTENTION):
                outputs = self._model.model.get_image_features(
                    pixel_values=to_device(torch.cat(pixels), device).to(self._loaded.dtype),
                    image_grid_thw=to_device(torch.cat(grids), device)).pooler_output
            for image_hash, output in zip(to_encode, outputs, strict=True):
                encoded[image_hash] = output
                encodings.put(image_hash, output)
        return torch.cat([encoded[image_hash][first:end] for image_hash, first, end in pieces])

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
