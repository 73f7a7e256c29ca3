"""The compiled operations between a decoder layer's products (senab/csrc/decode_layer.cpp).

They must equal transformers' modules to the bit, row by row whatever the batch, so that a
decode step through them picks the same tokens as the model's forward call.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers.models.llama import modeling_llama as llama

import senab.fastdecode as fastdecode

pytestmark = pytest.mark.skipif(fastdecode.layer_ops_blocker() is not None,
                                reason=f"no compiled layer operations here: {fastdecode.layer_ops_blocker()}")

DTYPES = [torch.float32, torch.bfloat16]
HEAD = 64


def ops():
    return torch.ops.senab_layer


def sample(generator, *shape, dtype):
    return (torch.randn(*shape, generator=generator) * 3).to(dtype)


def rotary(rows: int, positions: list[int], dtype):
    config = llama.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=HEAD,
                               rope_theta=100000.0)
    like = torch.zeros(rows, 1, 576, dtype=dtype)
    return llama.LlamaRotaryEmbedding(config)(like, torch.tensor(positions).view(rows, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_norms_and_activation_equal_transformers(rows, dtype):
    generator = torch.Generator().manual_seed(rows)
    residual, update = sample(generator, rows, 1, 576, dtype=dtype), sample(generator, rows, 1, 576, dtype=dtype)
    norm = llama.LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data = sample(generator, 576, dtype=dtype)
    assert torch.equal(ops().rms_norm(residual, norm.weight, 1e-5), norm(residual))
    total, normed = ops().add_rms_norm(residual, update, norm.weight, 1e-5)
    assert torch.equal(total, residual + update)
    assert torch.equal(normed, norm(residual + update))
    # Gate and up as the two halves of one fused product: strided views, no copies.
    fused = sample(generator, rows, 1, 2 * 1536, dtype=dtype)
    gate, up = fused.split([1536, 1536], -1)
    out = ops().silu_mul(gate, up)
    assert out.shape == (rows, 1, 1536)
    assert out.dtype == dtype
    assert torch.equal(out, F.silu(gate) * up)
    # Two-dimensional inputs give two-dimensional outputs.
    assert torch.equal(ops().rms_norm(residual[:, 0], norm.weight, 1e-5), norm(residual[:, 0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_rope_cache_equals_transformers(rows, dtype):
    """Rotated q in groups of its key head; rotated k and v written at one position of the cache, nothing else."""
    generator = torch.Generator().manual_seed(100 + rows)
    qkv = sample(generator, rows, 1, 576 + 2 * 192, dtype=dtype)
    query, key, value = qkv.split([576, 192, 192], -1)
    cos, sin = rotary(rows, [7 + 13 * row for row in range(rows)], dtype)
    keys, values = sample(generator, rows, 3, 40, HEAD, dtype=dtype), sample(generator, rows, 3, 40, HEAD, dtype=dtype)
    before_keys, before_values = keys.clone(), values.clone()
    out = ops().rope_cache(query, key, value, cos, sin, keys, values, 21, 3)

    shape = (rows, 1, -1, HEAD)
    q, k = (x.view(shape).transpose(1, 2) for x in (query, key))
    expected_q = q * cos.unsqueeze(1) + llama.rotate_half(q) * sin.unsqueeze(1)
    expected_k = k * cos.unsqueeze(1) + llama.rotate_half(k) * sin.unsqueeze(1)
    assert out.shape == (rows, 3, 3, HEAD)
    assert torch.equal(out, expected_q.reshape(rows, 3, 3, HEAD))
    assert torch.equal(keys[:, :, 21], expected_k[:, :, 0])
    assert torch.equal(values[:, :, 21], value.view(shape).transpose(1, 2)[:, :, 0])
    others = [p for p in range(40) if p != 21]
    assert torch.equal(keys[:, :, others], before_keys[:, :, others])
    assert torch.equal(values[:, :, others], before_values[:, :, others])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_rows_do_not_depend_on_the_batch(dtype):
    generator = torch.Generator().manual_seed(7)
    rows = 16
    hidden, update = sample(generator, rows, 1, 576, dtype=dtype), sample(generator, rows, 1, 576, dtype=dtype)
    weight = sample(generator, 576, dtype=dtype)
    qkv = sample(generator, rows, 1, 960, dtype=dtype)
    cos, sin = rotary(rows, list(range(rows)), dtype)
    keys, values = torch.zeros(rows, 3, 8, HEAD, dtype=dtype), torch.zeros(rows, 3, 8, HEAD, dtype=dtype)
    total, normed = ops().add_rms_norm(hidden, update, weight, 1e-5)
    query = ops().rope_cache(*qkv.split([576, 192, 192], -1), cos, sin, keys, values, 3, 3)
    for row in (0, 9, 15):
        single = slice(row, row + 1)
        alone_keys, alone_values = torch.zeros_like(keys[single]), torch.zeros_like(values[single])
        alone_total, alone_normed = ops().add_rms_norm(hidden[single], update[single], weight, 1e-5)
        alone_query = ops().rope_cache(*qkv[single].split([576, 192, 192], -1), cos[single], sin[single], alone_keys,
                                       alone_values, 3, 3)
        assert torch.equal(alone_total[0], total[row])
        assert torch.equal(alone_normed[0], normed[row])
        assert torch.equal(alone_query[0], query[row])
        assert torch.equal(alone_keys[0], keys[row])
        assert torch.equal(alone_values[0], values[row])


def test_bad_input_names_the_value():
    x = torch.zeros(2, 1, 64)
    weight = torch.ones(64)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        ops().rms_norm(x.half(), weight.half(), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be Float, got BFloat16"):
        ops().rms_norm(x, weight.bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be \(64,\)"):
        ops().rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(RuntimeError, match=r"x must be \(B, W\) or \(B, 1, W\), got \[2, 3, 64\]"):
        ops().rms_norm(torch.zeros(2, 3, 64), weight, 1e-5)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops().rms_norm(torch.zeros(2, 64, 2)[..., 0], weight, 1e-5)
    with pytest.raises(RuntimeError, match=r"x must match residual's shape"):
        ops().add_rms_norm(x, x[:1], weight, 1e-5)
    with pytest.raises(RuntimeError, match="up must be Float, got BFloat16"):
        ops().silu_mul(x, x.bfloat16())

    q, kv = torch.ones(2, 1, 4 * 16), torch.ones(2, 1, 2 * 16)
    cos = sin = torch.ones(2, 1, 16)
    keys, values = torch.full((2, 2, 5, 16), 7.0), torch.full((2, 2, 5, 16), 9.0)
    with pytest.raises(RuntimeError, match="position 5 is outside the 5 positions of keys"):
        ops().rope_cache(q, kv, kv, cos, sin, keys, values, 5, 2)
    with pytest.raises(RuntimeError, match=r"q's 4 heads must be groups \(3\) times k's 2"):
        ops().rope_cache(q, kv, kv, cos, sin, keys, values, 0, 3)
    with pytest.raises(RuntimeError, match=r"values must be \(2, 2, positions, 16\)"):
        ops().rope_cache(q, kv, kv, cos, sin, keys, torch.zeros(2, 3, 5, 16), 0, 2)
    with pytest.raises(RuntimeError, match="cos must have an even, positive head size, got 15"):
        ops().rope_cache(q, kv, kv, cos[..., :15], sin[..., :15], keys, values, 0, 2)
    with pytest.raises(RuntimeError, match="v must be Float, got BFloat16"):
        ops().rope_cache(q, kv, kv.bfloat16(), cos, sin, keys, values, 0, 2)
    with pytest.raises(RuntimeError, match=r"keys must have the head size 8 of cos"):
        ops().rope_cache(q, kv, kv, cos[..., :8], sin[..., :8], keys, values, 0, 2)
    # Refused calls write nothing into either cache.
    assert torch.equal(keys, torch.full((2, 2, 5, 16), 7.0))
    assert torch.equal(values, torch.full((2, 2, 5, 16), 9.0))
    # The same arguments with a valid position do write, so the checks above can fail.
    ops().rope_cache(q, kv, kv, cos, sin, keys, values, 4, 2)
    assert not torch.equal(values, torch.full((2, 2, 5, 16), 9.0))
