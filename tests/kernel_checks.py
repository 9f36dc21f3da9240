"""The decode step's Triton kernels against their torch references, on CPU under Triton's interpreter.

Run by test_kernels.py in a process started with TRITON_INTERPRET=1 (the mode is fixed when Triton is imported).
The interpreter executes the kernels' own code (indexing, masks, splits, online softmax); only speed needs a GPU.
It rounds fp32 → bf16 toward zero where a GPU rounds to nearest, so bf16 cases allow one bf16 step.
"""

from __future__ import annotations

import pytest
import torch

from shizhen.engine import kernels

assert kernels.triton is not None and kernels.triton.knobs.runtime.interpret, "run with TRITON_INTERPRET=1"

TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture
def interpreted():
    return kernels


def both(interpreted, monkeypatch, function: str, *args):
    """(kernel result, reference result), each on its own copy of the tensor arguments (some are written)."""
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(interpreted, "_on_triton", lambda tensor, use=use_kernel: use)
        copies = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
        results.append((getattr(interpreted, function)(*copies), copies))
    return results


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_updates_the_residual_and_normalises(interpreted, monkeypatch, dtype, with_delta):
    residual, delta, weight = (torch.randn(3, 80, dtype=dtype) for _ in range(3))
    delta = delta if with_delta else None
    (out, (_, res_k, _, _)), (ref, (_, res_r, _, _)) = both(interpreted, monkeypatch, "add_rms_norm", delta,
                                                              residual, weight[0], 1e-6)
    assert_close(out, ref, dtype)
    assert_close(res_k, res_r, dtype)
    assert torch.equal(res_r, residual + delta if with_delta else residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv(interpreted, monkeypatch, dtype, with_bias):
    x, weight, bias = torch.randn(1, 512, dtype=dtype), torch.randn(12, 512, dtype=dtype), torch.randn(12, dtype=dtype)
    (out, _), (ref, _) = both(interpreted, monkeypatch, "linear", x, weight, bias if with_bias else None)
    assert out.shape == (1, 12)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_to_cache_rotates_and_writes_each_row_through_its_block_table(interpreted, monkeypatch, dtype):
    heads, kv_heads, dim, batch, block = 4, 2, 16, 3, 16
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, dtype=dtype)
    angles = torch.randn(batch, dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    keys, values = torch.zeros(8, kv_heads, block, dim, dtype=dtype), torch.zeros(8, kv_heads, block, dim, dtype=dtype)
    tables = torch.tensor([[2, 4, 0], [0, 0, 0], [7, 0, 0], [0, 0, 0], [3, 5, 1]])
    slots, positions = torch.tensor([4, 0, 2]), torch.tensor([39, 0, 5])  # blocks 1, 2 and 7; offsets 7, 0, 5
    (query, copies_k), (ref, copies_r) = both(interpreted, monkeypatch, "rotary_to_cache", qkv, cos, sin, keys,
                                              values, tables, slots, positions, heads, kv_heads)
    assert query.shape == (batch, heads, dim)
    assert_close(query, ref, dtype)
    assert_close(copies_k[3], copies_r[3], dtype)
    assert torch.equal(copies_k[4], copies_r[4])
    written = copies_r[3].abs().sum(-1) != 0  # [blocks, kv_heads, offsets]
    assert written.sum() == batch * kv_heads
    assert written[1, :, 7].all() and written[2, :, 0].all() and written[7, :, 5].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(interpreted, monkeypatch, dtype):
    gate_up = torch.randn(2, 3000, dtype=dtype)  # 1,500 wide: a full block and a masked one
    (out, _), (ref, _) = both(interpreted, monkeypatch, "silu_mul", gate_up)
    assert out.shape == (2, 1500)
    assert_close(out, ref, dtype)


def paged(contiguous: torch.Tensor, block: int, tables: torch.Tensor) -> torch.Tensor:
    """[rows, kv_heads, length, dim] → a paged store holding row r's blocks at tables[r] (block 0 stays scratch)."""
    rows, kv_heads, length, dim = contiguous.shape
    padded = torch.zeros(rows, kv_heads, tables.shape[1] * block, dim, dtype=contiguous.dtype)
    padded[:, :, :length] = contiguous
    store = torch.zeros(tables.numel() + 1, kv_heads, block, dim, dtype=contiguous.dtype)
    store[tables.flatten()] = padded.view(rows, kv_heads, -1, block, dim).transpose(1, 2).reshape(-1, kv_heads, block,
                                                                                                  dim)
    return store


@pytest.mark.parametrize("dtype", [torch.float32])  # the interpreter's tl.dot reads bf16 as raw bits
@pytest.mark.parametrize("batch", [3, 8])  # 3 rows are split across programs (and merged); 8 are not
def test_decode_attention_reads_each_rows_own_blocks_and_length(interpreted, monkeypatch, dtype, batch):
    heads, kv_heads, dim, length, block = 4, 2, 16, 200, 16
    query = torch.randn(batch, heads, dim, dtype=dtype)
    keys, values = (torch.randn(batch, kv_heads, length, dim, dtype=dtype) for _ in range(2))
    tables = (torch.randperm(batch * -(-length // block)) + 1).view(batch, -1)  # shuffled blocks, none is 0
    key_store, value_store = paged(keys, block, tables), paged(values, block, tables)
    assert torch.equal(interpreted.gather_positions(key_store, tables, length), keys)
    cache_lens = torch.tensor([5, 150, 199, 0, 64, 63, 128, 1])[:batch]
    (out, _), (ref, _) = both(interpreted, monkeypatch, "decode_attention", query, key_store, value_store, tables,
                              cache_lens, 0.25, length)
    assert out.shape == (batch, heads * dim)
    assert_close(out, ref, dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(  # row 1 alone, from the contiguous tensors
        query[1:2].view(1, kv_heads, heads // kv_heads, dim), keys[1:2, :, :151], values[1:2, :, :151], scale=0.25)
    assert_close(out[1], expected.reshape(-1), dtype)
