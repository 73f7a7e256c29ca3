"""The AMX 4-bit product (senab.amx): its numbers, its rows, and where it stays off."""

from __future__ import annotations

import pytest
import torch

import senab.amx as amx
import senab.quant as quant
from senab.native import NativeError
from senab.quant import GroupwiseGrid, Int4Linear

needs_amx = pytest.mark.skipif(amx.amx_kernel_blocker() is not None,
                               reason=f"the AMX product does not serve here: {amx.amx_kernel_blocker()}")


@pytest.fixture
def fresh_load():
    """Let a test decide availability again, and restore the cached result afterwards."""
    amx._load.cache_clear()
    yield
    amx._load.cache_clear()


def random_layer(out_features: int = 192, in_features: int = 96, seed: int = 0) -> Int4Linear:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.int32)
    groups = in_features // quant.GROUP_SIZE
    scales = torch.rand(out_features, groups, generator=generator) / 10 + 0.005
    minimums = -torch.rand(out_features, groups, generator=generator)
    layer = Int4Linear(GroupwiseGrid(codes, scales, minimums, 0.0), None).to(torch.bfloat16)
    layer.amx = True
    return layer


def reference(layer: Int4Linear, flat: torch.Tensor) -> torch.Tensor:
    """Return the float64 product with the layer's weights rounded to bfloat16, as the AMX product rounds them."""
    weight = layer.dequantized_weight().to(torch.bfloat16).double()
    return flat.double() @ weight.t()


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_amx_product_matches_float64(rows):
    layer = random_layer()
    flat = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = amx.int4_mm(flat, layer.packed, layer.scales_and_zeros)
    expected = reference(layer, flat)
    assert out.dtype == torch.bfloat16
    assert out.shape == (rows, layer.out_features)
    # Output rounding to bfloat16 (2^-8 relative) plus float32 sums of 96 products.
    assert torch.allclose(out.double(), expected, rtol=2 ** -7, atol=1e-3 * expected.abs().max().item())


@needs_amx
def test_amx_product_row_invariant():
    layer = random_layer(out_features=128, in_features=64)
    flat = torch.randn(16, layer.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    batch = amx.int4_mm(flat, layer.packed, layer.scales_and_zeros)
    for row in (0, 7, 15):
        alone = amx.int4_mm(flat[row:row + 1].contiguous(), layer.packed, layer.scales_and_zeros)
        assert torch.equal(alone[0], batch[row])


@needs_amx
def test_amx_product_rejects_bad_input():
    layer = random_layer()
    with pytest.raises(RuntimeError, match="invalid 17 rows"):
        amx.int4_mm(torch.zeros(17, layer.in_features, dtype=torch.bfloat16), layer.packed, layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match="bfloat16"):
        amx.int4_mm(torch.zeros(2, layer.in_features), layer.packed, layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match="input size 64"):
        amx.int4_mm(torch.zeros(2, 64, dtype=torch.bfloat16), layer.packed, layer.scales_and_zeros)


@needs_amx
def test_layer_picks_kernel_by_rows():
    """Rows MIN_ROWS to MAX_ROWS take the AMX product, fewer rows PyTorch's kernel, more the copy."""
    layer = random_layer()
    generator = torch.Generator().manual_seed(3)
    for rows in (1, amx.MIN_ROWS - 1, amx.MIN_ROWS, amx.MAX_ROWS):
        x = torch.randn(rows, 1, layer.in_features, generator=generator).to(torch.bfloat16)
        flat = x.reshape(rows, -1)
        if rows >= amx.MIN_ROWS:
            expected = amx.int4_mm(flat, layer.packed, layer.scales_and_zeros)
        else:
            expected = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.packed, quant.GROUP_SIZE,
                                                                  layer.scales_and_zeros)
        assert torch.equal(layer(x).reshape(rows, -1), expected), rows
    layer.keep_dense_copy(layer.dequantized_weight())
    assert not layer.copy_serves(amx.MAX_ROWS, 1)
    assert layer.copy_serves(amx.MAX_ROWS + 1, 1)
    assert layer.copy_serves(1, 2)
    layer.amx = False
    assert layer.copy_serves(quant.INT4_MAX_ROWS + 1, 1)


@needs_amx
def test_float32_layer_stays_on_pytorch_kernel():
    """A model cast to float32 after quantization keeps working: the AMX product takes bfloat16 only."""
    layer = random_layer().to(torch.float32)
    x = torch.randn(amx.MIN_ROWS, 1, layer.in_features)
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(amx.MIN_ROWS, -1), layer.packed,
                                                          quant.GROUP_SIZE, layer.scales_and_zeros)
    assert torch.equal(layer(x).reshape(amx.MIN_ROWS, -1), expected)


def test_switched_off_by_environment(monkeypatch, fresh_load):
    monkeypatch.setattr(amx, "cpu_flags", lambda: frozenset(amx.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("SENAB_NATIVE_KERNELS", "0")
    assert "SENAB_NATIVE_KERNELS" in amx.amx_kernel_blocker()


def test_cpu_without_amx_names_flags(monkeypatch, fresh_load):
    monkeypatch.setattr(amx, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "amx_tile" in amx.amx_kernel_blocker()


def test_missing_compiler_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SENAB_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "senab-no-such-compiler")
    with pytest.raises(NativeError, match="no C.. compiler 'senab-no-such-compiler'"):
        amx.build()


def test_failed_build_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("SENAB_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(NativeError, match=r"failed \(exit 1\)"):
        amx.build()
    assert list((tmp_path / "kernels").iterdir()) == []


def test_failed_build_falls_back(monkeypatch, tmp_path, fresh_load):
    """Where the build fails, the blocker carries the reason instead of raising."""
    monkeypatch.setenv("SENAB_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(amx, "cpu_flags", lambda: frozenset(amx.REQUIRED_CPU_FLAGS))
    assert "failed (exit 1)" in amx.amx_kernel_blocker()
