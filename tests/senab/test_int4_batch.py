"""The 4-bit products for batches (senab.int4_batch): their numbers, their rows, and where they stay off."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import senab.int4_batch as int4_batch
import senab.quant as quant
from senab.int4_batch import AMX, AVX512, PRODUCTS, BatchProduct
from senab.native import NativeError
from senab.quant import GroupwiseGrid, Int4Linear


def serving(product: BatchProduct):
    """A parameter that runs its test only where `product` serves."""
    return pytest.param(product, id=product.name, marks=pytest.mark.skipif(
        product.blocker() is not None, reason=f"the {product.name} product does not serve here: {product.blocker()}"))


ALL = [serving(product) for product in PRODUCTS]


@pytest.fixture
def fresh_load():
    """Let a test decide availability again, and restore the cached result afterwards."""
    int4_batch._load.cache_clear()
    yield
    int4_batch._load.cache_clear()


def random_layer(product: BatchProduct | None, out_features: int = 192, in_features: int = 96,
                 seed: int = 0) -> Int4Linear:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.int32)
    groups = in_features // quant.GROUP_SIZE
    scales = torch.rand(out_features, groups, generator=generator) / 10 + 0.005
    minimums = -torch.rand(out_features, groups, generator=generator)
    layer = Int4Linear(GroupwiseGrid(codes, scales, minimums, 0.0), None).to(torch.bfloat16)
    layer.batch_product = product
    return layer


def largest_rows(product: BatchProduct) -> int:
    """Rows enough to cross the AVX-512 product's tiles of 64 rows, or the AMX product's limit."""
    return product.max_rows or 130


@pytest.mark.parametrize("product", ALL)
@pytest.mark.parametrize("rows", [1, 5, 16, 70])
def test_product_matches_float64(product, rows):
    rows = min(rows, largest_rows(product))
    layer = random_layer(product)
    flat = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = product(flat, layer.packed, layer.scales_and_zeros)
    expected = flat.double() @ layer.dequantized_weight().double().t()
    assert out.dtype == torch.bfloat16
    assert out.shape == (rows, layer.out_features)
    # Output rounding to bfloat16 (2^-8 relative), the AMX product's weights rounded to
    # bfloat16 too, plus float32 sums of 96 products.
    assert torch.allclose(out.double(), expected, rtol=2 ** -7, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("product", ALL)
def test_product_row_invariant(product):
    layer = random_layer(product, out_features=128, in_features=64)
    rows = largest_rows(product)
    flat = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    batch = product(flat, layer.packed, layer.scales_and_zeros)
    for row in sorted({0, 7, 15, 63, 64, rows - 1} & set(range(rows))):
        alone = product(flat[row:row + 1].contiguous(), layer.packed, layer.scales_and_zeros)
        assert torch.equal(alone[0], batch[row]), row
    # And in a batch of another size, where the row falls in another pass of the kernel.
    assert torch.equal(product(flat[5:].contiguous(), layer.packed, layer.scales_and_zeros), batch[5:])


@pytest.mark.parametrize("product", ALL)
def test_product_rejects_bad_input(product):
    layer = random_layer(product)
    if product.max_rows is not None:
        with pytest.raises(RuntimeError, match=f"invalid {product.max_rows + 1} rows"):
            product(torch.zeros(product.max_rows + 1, layer.in_features, dtype=torch.bfloat16), layer.packed,
                    layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match="0 rows"):
        product(torch.zeros(0, layer.in_features, dtype=torch.bfloat16), layer.packed, layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match="bfloat16"):
        product(torch.zeros(2, layer.in_features), layer.packed, layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match="input size 64"):
        product(torch.zeros(2, 64, dtype=torch.bfloat16), layer.packed, layer.scales_and_zeros)
    with pytest.raises(RuntimeError, match="packed weights"):
        product(torch.zeros(2, layer.in_features, dtype=torch.bfloat16), layer.packed[:-1], layer.scales_and_zeros)


def pytorch_kernel(layer: Int4Linear, flat: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.packed, quant.GROUP_SIZE, layer.scales_and_zeros)


@pytest.mark.parametrize("product", ALL)
def test_layer_picks_kernel_by_rows(product):
    """Decode steps of min_rows and more take the product, fewer PyTorch's kernel; with a copy, more the copy."""
    layer = random_layer(product)
    generator = torch.Generator().manual_seed(3)
    for rows in (1, product.min_rows - 1, product.min_rows, largest_rows(product)):
        x = torch.randn(rows, 1, layer.in_features, generator=generator).to(torch.bfloat16)
        flat = x.reshape(rows, -1)
        expected = product(flat, layer.packed, layer.scales_and_zeros) if rows >= product.min_rows \
            else pytorch_kernel(layer, flat)
        assert torch.equal(layer(x).reshape(rows, -1), expected), rows
    layer.keep_dense_copy(layer.dequantized_weight())
    assert layer.copy_serves(1, 2)
    if product.max_rows is not None:
        assert not layer.copy_serves(product.max_rows, 1)
        assert layer.copy_serves(product.max_rows + 1, 1)
    else:
        assert not layer.copy_serves(1000, 1)
    layer.batch_product = None
    assert layer.copy_serves(quant.INT4_MAX_ROWS + 1, 1)


@pytest.mark.parametrize("product", ALL)
def test_layer_runs_prompts_as_product_says(product):
    """A prompt's positions take the product where it serves prompts, as one call whatever the prompts beside it."""
    layer = random_layer(product)
    x = torch.randn(2, 21, layer.in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    flat = x.reshape(-1, layer.in_features)
    out = layer(x).reshape(-1, layer.out_features)
    if product.prompts:
        assert torch.equal(out, product(flat, layer.packed, layer.scales_and_zeros))
        assert torch.equal(layer(x[1:]).reshape(-1, layer.out_features), out[21:])
    else:
        assert torch.equal(out, pytorch_kernel(layer, flat))


@pytest.mark.parametrize("product", ALL)
def test_float32_layer_stays_on_pytorch_kernel(product):
    """A model cast to float32 after quantization keeps working: the products take bfloat16 only."""
    layer = random_layer(product).to(torch.float32)
    x = torch.randn(product.min_rows, 1, layer.in_features)
    expected = pytorch_kernel(layer, x.reshape(product.min_rows, -1))
    assert torch.equal(layer(x).reshape(product.min_rows, -1), expected)


def test_product_serves_by_rows_and_positions():
    assert not AMX.serves(AMX.min_rows - 1, 1)
    assert AMX.serves(AMX.min_rows, 1)
    assert AMX.serves(16, 1)
    assert not AMX.serves(17, 1)
    assert not AMX.serves(8, 2)
    assert AVX512.serves(1000, 1)
    assert AVX512.serves(1, 2)
    assert not AVX512.serves(AVX512.min_rows - 1, 1)
    assert AMX.describe() == "decode steps of 5 to 16 rows on the AMX 4-bit product"
    assert AVX512.describe() == "prompts and decode steps of 4 or more rows on the AVX-512 BF16 4-bit product"
    # Where bfloat16 copies take the prompts, the log line does not claim them for the product.
    assert AVX512.describe(with_prompts=False) == "decode steps of 4 or more rows on the AVX-512 BF16 4-bit product"


@pytest.mark.parametrize("product", PRODUCTS, ids=lambda product: product.name)
def test_switched_off_by_environment(product, monkeypatch, fresh_load):
    monkeypatch.setattr(int4_batch, "cpu_flags", lambda: frozenset(product.cpu_flags))
    monkeypatch.setenv("SENAB_NATIVE_KERNELS", "0")
    assert "SENAB_NATIVE_KERNELS" in product.blocker()


def test_cpu_without_flags_names_them(monkeypatch, fresh_load):
    monkeypatch.setattr(int4_batch, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "amx_tile" in AMX.blocker()
    assert "avx512_bf16" in AVX512.blocker()
    product, reason = int4_batch.batch_product()
    assert product is None
    assert reason.startswith("AMX: the CPU lacks amx_tile")
    assert "AVX-512 BF16: the CPU lacks avx512_bf16" in reason


def test_first_serving_product_wins(fresh_load, monkeypatch):
    """Without AMX the AVX-512 product serves where it builds; the AMX product is not tried further."""
    monkeypatch.setattr(int4_batch, "_load", lambda product: "not here" if product is AMX else None)
    assert int4_batch.batch_product() == (AVX512, "")
    monkeypatch.setattr(int4_batch, "_load", lambda product: None)
    assert int4_batch.batch_product() == (AMX, "")


@pytest.mark.parametrize("product", PRODUCTS, ids=lambda product: product.name)
def test_missing_compiler_named(product, monkeypatch, tmp_path):
    monkeypatch.setenv("SENAB_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "senab-no-such-compiler")
    with pytest.raises(NativeError, match="no C.. compiler 'senab-no-such-compiler'"):
        product.build()


def test_failed_build_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("SENAB_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(NativeError, match=r"failed \(exit 1\)"):
        AVX512.build()
    assert list((tmp_path / "kernels").iterdir()) == []


@pytest.mark.parametrize("product", PRODUCTS, ids=lambda product: product.name)
def test_failed_build_falls_back(product, monkeypatch, tmp_path, fresh_load):
    """Where the build fails, the blocker carries the reason instead of raising."""
    monkeypatch.setenv("SENAB_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(int4_batch, "cpu_flags", lambda: frozenset(product.cpu_flags))
    # torch packs in blocks of 32 where its kernel runs on AVX2; the build comes after that check.
    monkeypatch.setattr(quant, "packed_block", lambda: int4_batch.BLOCK)
    assert "failed (exit 1)" in product.blocker()


def test_self_check_rejects_wrong_product(monkeypatch, fresh_load):
    """A product that computes something else is not used, and the reason gives how far off it is."""
    wrong = dataclasses.replace(AVX512, name="wrong", operator="aten::zeros_like")
    monkeypatch.setattr(BatchProduct, "__call__", lambda self, flat, packed, scales: torch.zeros(
        flat.shape[0], 2 * int4_batch.BLOCK, dtype=torch.bfloat16))
    assert "off by 1 of its largest output" in int4_batch._self_check(wrong)
