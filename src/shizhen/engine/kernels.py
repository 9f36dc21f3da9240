"""The text layers' fused GPU kernels (Triton), each beside the plain-torch arithmetic it stands in for.

At batch 1 a decode step of the 32B model is bound by reading 65 GB of weights, so every kernel that is not a
weight read is overhead: transformers' layers launch ~20 small kernels per layer, text_stack.py's launch 8. Each
public function below runs its Triton kernel on a CUDA tensor and the torch reference elsewhere (the CPU test suite;
TRITON_INTERPRET=1 runs the kernels themselves on CPU, which the kernel tests do). The kernels round where the
references round, so the two agree to the last bit except where an exponential or a summation order differs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch.nn import functional as F

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
else:  # pragma: no cover - every supported install has Triton; torch still runs everything without it
    triton = None


def _on_triton(tensor: torch.Tensor) -> bool:
    return triton is not None and (tensor.is_cuda or triton.knobs.runtime.interpret)


# --- residual add + RMSNorm ----------------------------------------------------------------------------------------
def add_rms_norm(delta: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta (in place, when given), then RMSNorm(residual) * weight — one pass over the row.

    Rows are [batch, hidden]. Rounds like transformers' Qwen2 RMSNorm: normalised in fp32, cast, then scaled."""
    if not _on_triton(residual):
        if delta is not None:
            residual.add_(delta)
        variance = residual.float().pow(2).mean(-1, keepdim=True)
        return weight * (residual.float() * torch.rsqrt(variance + eps)).to(residual.dtype)
    rows, hidden = residual.shape
    out = torch.empty_like(residual)
    _add_rms_norm_kernel[(rows,)](delta if delta is not None else residual, residual, weight, out, hidden, eps,
                                  HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(hidden), num_warps=8)
    return out


# --- matrix-vector product ------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. One row on the GPU: a Triton GEMV, which reads the 32B model's weights faster than
    cuBLAS does at batch 1 (bench/gemv.py); more rows are a GEMM that cuBLAS does well."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    block_k = next((size for size in (1024, 512, 256) if in_features % size == 0), None)
    if rows != 1 or block_k is None or out_features % _GEMV_ROWS or not _on_triton(x):
        return F.linear(x, weight, bias)
    out = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    _gemv_kernel[(out_features // _GEMV_ROWS,)](x, weight, bias if bias is not None else x, out, in_features,
                                                HAS_BIAS=bias is not None, BLOCK_N=_GEMV_ROWS, BLOCK_K=block_k,
                                                num_warps=8 if in_features >= 16384 else 4)
    return out


_GEMV_ROWS = 4  # weight rows per program: enough programs to fill every SM even for 5,120-row matrices


# --- rotary embedding + KV-cache write ------------------------------------------------------------------------------
def rotary_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    block_tables: torch.Tensor, slots: torch.Tensor, cache_positions: torch.Tensor, heads: int,
                    kv_heads: int) -> torch.Tensor:
    """Split each token row of fused q/k/v [tokens, (heads + 2 kv_heads) * dim], rotate q and k by cos/sin
    [tokens, dim], write k and v into the paged `keys`/`values` [blocks, kv_heads, block size, dim] at position
    cache_positions[row] of sequence slots[row] (whose blocks are its row of `block_tables`), and return the
    rotated queries [tokens, heads, dim]."""
    tokens = qkv.shape[0]
    dim = cos.shape[-1]
    block_size = keys.shape[2]
    if not _on_triton(qkv):
        qkv = qkv.view(tokens, heads + 2 * kv_heads, dim)
        qk, value = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
        half = dim // 2
        qk = qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin[:, None]
        query, key = qk.split([heads, kv_heads], dim=1)
        blocks = block_tables[slots, cache_positions // block_size]
        keys[blocks, :, cache_positions % block_size] = key
        values[blocks, :, cache_positions % block_size] = value
        return query.contiguous()
    query = torch.empty(tokens, heads, dim, dtype=qkv.dtype, device=qkv.device)
    _rotary_to_cache_kernel[(tokens, heads + 2 * kv_heads)](
        qkv, cos, sin, block_tables, slots, cache_positions, query, keys, values, qkv.stride(0),
        block_tables.stride(0), *keys.stride()[:3], HEADS=heads, KV_HEADS=kv_heads, DIM=dim, BLOCK_SIZE=block_size)
    return query


# --- SiLU(gate) * up -----------------------------------------------------------------------------------------------
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * n] (gate then up, as the fused gate/up projection lays them out) → silu(gate) * up, [rows, n]."""
    if not _on_triton(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(width // 2, 1024))](gate_up, out, width // 2, BLOCK=1024)
    return out


# --- decode attention ----------------------------------------------------------------------------------------------
def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                     cache_lens: torch.Tensor, scale: float, length: int) -> torch.Tensor:
    """One query token per row: query [batch, heads, dim] of sequence slot `row` attends to its positions
    [0, cache_lens[row]] (its own token included) in the paged keys/values [blocks, kv_heads, block size, dim];
    `length` bounds every row's positions. Returns [batch, heads * dim].

    The kernel reads only each row's real positions, a block at a time (split across programs when the batch is
    too small to fill the GPU), and lets a K/V head's query group share each load — no K/V copies, no mask."""
    batch, heads, dim = query.shape
    kv_heads, block_size = keys.shape[1], keys.shape[2]
    if not _on_triton(query):
        tables = block_tables[:batch]
        mask = torch.arange(length, device=query.device)[None, :] <= cache_lens[:batch, None]
        grouped = query.view(batch, kv_heads, heads // kv_heads, dim)  # the query group stands in for positions
        out = F.scaled_dot_product_attention(grouped, gather_positions(keys, tables, length),
                                             gather_positions(values, tables, length),
                                             attn_mask=mask.view(batch, 1, 1, length), scale=scale)
        return out.reshape(batch, heads * dim)
    splits = _attention_splits(query.device, batch * kv_heads, length)
    out = torch.empty(batch, heads * dim, dtype=query.dtype, device=query.device)
    partial = (torch.empty(batch, heads, splits, dim + 2, dtype=torch.float32, device=query.device)
               if splits > 1 else out)  # the kernel writes it only when there are splits to merge
    group = heads // kv_heads
    _decode_attention_kernel[(batch, kv_heads, splits)](
        query, keys, values, block_tables, cache_lens, out, partial, scale, block_tables.stride(0),
        *keys.stride()[:3], GROUP=group, GROUP_BLOCK=max(16, triton.next_power_of_2(group)), DIM=dim,
        SPLITS=splits, BLOCK_L=block_size, num_warps=4, num_stages=2)
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](partial, out, SPLITS=splits, SPLITS_BLOCK=triton.next_power_of_2(splits),
                                             DIM=dim)
    return out


def gather_positions(store: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """Positions [0, length) of the sequences whose block tables are `tables` [rows, ≥ blocks], out of a paged
    store [blocks, kv_heads, block size, dim], as a [rows, kv_heads, length, dim] copy."""
    block_size = store.shape[2]
    # indexing the heads-first view copies once, already in [kv heads, rows, blocks, positions, dim] order: the
    # blocks and their positions then merge without a second copy
    blocks = store.transpose(0, 1)[:, tables[:, : -(-length // block_size)]]
    kv_heads, rows, count, _, dim = blocks.shape
    return blocks.transpose(0, 1).reshape(rows, kv_heads, count * block_size, dim)[:, :, :length]


def _attention_splits(device: torch.device, programs: int, length: int) -> int:
    """Enough programs for two per SM, but no split shorter than 128 positions; a power of two, as the count is
    compiled into the kernel: the decode graphs compile them all at start-up, and a step that decodes eagerly
    beside a prefill (any batch, any length) then never waits for a compile."""
    wanted = max(1, min(triton.cdiv(2 * _multiprocessors(device), programs), triton.cdiv(length, 128)))
    return 1 << (wanted.bit_length() - 1)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(delta_ptr, residual_ptr, weight_ptr, out_ptr, hidden, eps, HAS_DELTA: tl.constexpr,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        x = tl.load(residual_ptr + row * hidden + cols, mask=inside, other=0.0)
        if HAS_DELTA:
            delta = tl.load(delta_ptr + row * hidden + cols, mask=inside, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(residual_ptr.dtype.element_ty)
            tl.store(residual_ptr + row * hidden + cols, x, mask=inside)
        x = x.to(tl.float32)
        variance = tl.sum(x * x, axis=0) / hidden
        normed = (x * (1.0 / tl.sqrt(variance + eps))).to(out_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        tl.store(out_ptr + row * hidden + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(
            out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _gemv_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, in_features, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        weight_rows = weight_ptr + rows.to(tl.int64)[:, None] * in_features
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # reduced once at the end, not per block
        for k in range(0, in_features, BLOCK_K):
            w = tl.load(weight_rows + (k + cols)[None, :])
            x = tl.load(x_ptr + k + cols)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows).to(tl.float32)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _rotary_to_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, tables_ptr, slots_ptr, positions_ptr, query_ptr, keys_ptr,
                                values_ptr, qkv_row_stride, table_stride, block_stride, head_stride, position_stride,
                                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        dims = tl.arange(0, DIM)
        source = qkv_ptr + row * qkv_row_stride + head * DIM
        x = tl.load(source + dims)
        dtype = x.dtype
        if head < HEADS + KV_HEADS:  # q and k turn: x * cos + rotate_half(x) * sin, rounded as torch rounds
            partner = tl.load(source + (dims + DIM // 2) % DIM).to(tl.float32)
            rotated = tl.where(dims < DIM // 2, -partner, partner)
            cos = tl.load(cos_ptr + row * DIM + dims).to(tl.float32)
            sin = tl.load(sin_ptr + row * DIM + dims).to(tl.float32)
            x = ((x.to(tl.float32) * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)
        if head < HEADS:
            tl.store(query_ptr + (row * HEADS + head) * DIM + dims, x)
        else:
            kv_head = (head - HEADS) % KV_HEADS
            position = tl.load(positions_ptr + row)
            block = tl.load(tables_ptr + tl.load(slots_ptr + row) * table_stride + position // BLOCK_SIZE)
            target = block * block_stride + kv_head * head_stride + (position % BLOCK_SIZE) * position_stride
            if head < HEADS + KV_HEADS:
                tl.store(keys_ptr + target + dims, x)
            else:
                tl.store(values_ptr + target + dims, x)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=inside, other=0.0)
        up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=inside, other=0.0)
        dtype = gate.dtype
        gate = gate.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        tl.store(out_ptr + row * width + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=inside)

    @triton.jit
    def _decode_attention_kernel(query_ptr, keys_ptr, values_ptr, tables_ptr, cache_lens_ptr, out_ptr, partial_ptr,
                                 scale, table_stride, block_stride, head_stride, position_stride, GROUP: tl.constexpr,
                                 GROUP_BLOCK: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr,
                                 BLOCK_L: tl.constexpr):
        """Program (row, kv head, split): online softmax of the head's query group over the split's positions,
        one cache block (BLOCK_L positions) per iteration."""
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        heads = tl.num_programs(1) * GROUP
        group = tl.arange(0, GROUP_BLOCK)
        dims = tl.arange(0, DIM)
        in_group = group < GROUP
        head_ids = kv_head * GROUP + group
        query = tl.load(query_ptr + (row * heads + head_ids)[:, None] * DIM + dims[None, :],
                        mask=in_group[:, None], other=0.0)
        seq_len = tl.load(cache_lens_ptr + row) + 1
        chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_L) * BLOCK_L
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
        table = tables_ptr + row * table_stride
        best = tl.full((GROUP_BLOCK,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_BLOCK,), tl.float32)
        acc = tl.zeros((GROUP_BLOCK, DIM), tl.float32)
        for block in range(start, end, BLOCK_L):
            positions = block + tl.arange(0, BLOCK_L)
            valid = positions < end
            block_base = tl.load(table + block // BLOCK_L) * block_stride + kv_head * head_stride
            offsets = block_base + (positions % BLOCK_L).to(tl.int64)[:, None] * position_stride + dims[None, :]
            key = tl.load(keys_ptr + offsets, mask=valid[:, None], other=0.0)
            scores = tl.dot(query, tl.trans(key), input_precision="ieee") * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            correction = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best[:, None])
            total = total * correction + tl.sum(weights, axis=1)
            value = tl.load(values_ptr + offsets, mask=valid[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(weights.to(value.dtype), value, input_precision="ieee")
            best = new_best
        if SPLITS == 1:
            tl.store(out_ptr + (row * heads + head_ids)[:, None] * DIM + dims[None, :],
                     (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=in_group[:, None])
        else:  # per (row, head, split): DIM unnormalised sums, then the running max and the softmax denominator
            target = partial_ptr + ((row * heads + head_ids) * SPLITS + split) * (DIM + 2)
            tl.store(target[:, None] + dims[None, :], acc, mask=in_group[:, None])
            tl.store(target + DIM, best, mask=in_group)
            tl.store(target + DIM + 1, total, mask=in_group)

    @triton.jit
    def _merge_splits_kernel(partial_ptr, out_ptr, SPLITS: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
                             DIM: tl.constexpr):
        row_head = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        splits = tl.arange(0, SPLITS_BLOCK)
        real = splits < SPLITS
        dims = tl.arange(0, DIM)
        source = partial_ptr + (row_head * SPLITS + splits) * (DIM + 2)
        best = tl.load(source + DIM, mask=real, other=float("-inf"))
        total = tl.load(source + DIM + 1, mask=real, other=0.0)
        weights = tl.exp(best - tl.max(best, axis=0))  # an empty split has best -inf and weighs 0
        acc = tl.load(source[:, None] + dims[None, :], mask=real[:, None], other=0.0)
        out = tl.sum(acc * weights[:, None], axis=0) / tl.sum(total * weights, axis=0)
        tl.store(out_ptr + row_head * DIM + dims, out.to(out_ptr.dtype.element_ty))
