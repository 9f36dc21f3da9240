"""How big the KV cache is: it gets what the GPU has left after the weights and the activation peak."""

from __future__ import annotations

import logging

import torch

from .allocation import BLOCK_SIZE, blocks_for
from .model_runner import ModelRunner
from .prompt import PromptBuilder

log = logging.getLogger(__name__)
GIB = 1024**3


class NotEnoughMemory(RuntimeError):
    pass


def plan_blocks(runner: ModelRunner, builder: PromptBuilder, max_len: int, max_num_seqs: int,
                gpu_memory_utilization: float, prefill_tokens: int, kv_cache_tokens: int | None = None) -> int:
    """KV-cache blocks (the scratch block included) that fit in `gpu_memory_utilization` of the GPU, no more than
    `max_num_seqs` full-length sequences can use, nor than `kv_cache_tokens` if set (that many on CPU).

    The activation peak is measured by running the engine's own prefill of the most tokens one step may prefill,
    as many of them image tokens as fit (into a throwaway cache, whose bytes do not count), as vLLM does.
    """
    useful = max_num_seqs * blocks_for(max_len)
    if kv_cache_tokens is not None:
        useful = min(useful, blocks_for(kv_cache_tokens))
    useful += 1  # the scratch block
    if runner.device.type != "cuda":
        return useful
    per_token = runner.kv_bytes_per_token
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    probe_bytes = runner.probe_prefill(builder.planning_prompt(prefill_tokens))
    torch.cuda.synchronize()
    activation = torch.cuda.max_memory_allocated() - before - probe_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    used = total - free
    budget = total * gpu_memory_utilization - used - activation - runner.image_cache_bytes
    blocks = min(useful, int(budget // (BLOCK_SIZE * per_token)))
    log.info("GPU memory: %.1f GiB total, %.1f GiB in use, activation peak %.2f GiB, image encodings %.2f GiB; KV "
             "cache budget %.2f GiB (%d KiB per token) → %d blocks of %d tokens (%d tokens)", total / GIB, used / GIB,
             activation / GIB, runner.image_cache_bytes / GIB, budget / GIB, per_token // 1024, blocks, BLOCK_SIZE,
             (blocks - 1) * BLOCK_SIZE)
    if blocks < blocks_for(max_len) + 1:
        raise NotEnoughMemory(
            f"the KV cache needs {max_len * per_token / GIB:.2f} GiB for one {max_len}-token sequence but only "
            f"{max(budget, 0) / GIB:.2f} GiB is left after the weights; lower SHIZHEN_MAX_CONTEXT_LENGTH or raise "
            "SHIZHEN_GPU_MEMORY_UTILIZATION")
    return blocks
