import pytest
import torch

import senab.nca as nca
from senab.nca import NCACell, NCAConfig


@pytest.fixture
def cell() -> NCACell:
    torch.manual_seed(0)
    return NCACell(NCAConfig()).eval()


def test_parameter_count_pinned(cell):
    # conv 32->96 width 3 (9,312) + MLP 96->64, LayerNorm(64), 64->32 (8,416) + gate 96->1 (97)
    assert cell.num_parameters() == 9312 + 6208 + 128 + 2080 + 97


@pytest.mark.parametrize("chunks", [[10], [1] * 10, [4, 1, 5], [3, 3, 3, 1]])
def test_incremental_growth_equals_full(cell, chunks):
    x = torch.randn(2, sum(chunks), 32)
    full, _ = cell.grow(x)

    pieces, cache, start = [], None, 0
    for size in chunks:
        out, cache = cell.grow(x[:, start:start + size], cache)
        pieces.append(out)
        start += size

    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-6, rtol=0)


def test_growth_is_causal_with_finite_receptive_field(cell):
    x = torch.randn(1, 30, 32)
    base = cell(x)
    changed = x.clone()
    changed[:, 10] += 5.0

    after = cell(changed)

    assert torch.equal(after[:, :10], base[:, :10])
    reach = 10 + cell.config.receptive_field
    assert not torch.allclose(after[:, 10:reach + 1], base[:, 10:reach + 1])
    assert torch.equal(after[:, reach + 1:], base[:, reach + 1:])


def test_padded_positions_act_as_causal_padding(cell):
    x = torch.randn(1, 6, 32)
    padded = torch.cat([torch.randn(1, 3, 32), x], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 6])

    alone = cell(x)
    out = cell(padded, valid)

    torch.testing.assert_close(out[:, 3:], alone, atol=1e-6, rtol=0)
    assert torch.count_nonzero(out[:, :3]) == 0


@pytest.mark.parametrize("field", ["channels", "mlp_hidden", "steps", "kernel_width"])
def test_config_rejects_nonpositive(field):
    with pytest.raises(ValueError, match=field):
        NCAConfig(**{field: 0})


@pytest.mark.parametrize("width", [2, 3, 4])
def test_decode_step_without_autograd_equals_full(width):
    # One position at a time under no_grad takes the fused path (perception, first update
    # layer and gate folded into one matrix), which sums in another order.
    torch.manual_seed(width)
    cell = NCACell(NCAConfig(kernel_width=width)).eval()
    x = torch.randn(3, 12, 32)
    full, _ = cell.grow(x)
    with torch.no_grad():
        pieces, cache = [], None
        for t in range(12):
            out, cache = cell.grow(x[:, t:t + 1], cache)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_decode_step_follows_parameter_updates(cell):
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        before, _ = cell.grow(x)
        cell.update[3].bias.add_(0.5)  # an in-place change, as an optimizer step makes
        after, _ = cell.grow(x)
    expected, _ = cell.grow(x)  # with autograd: the general path
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


needs_native = pytest.mark.skipif(nca.native_blocker() is not None,
                                  reason=f"the compiled decode step does not serve here: {nca.native_blocker()}")


def decode(cell: NCACell, x: torch.Tensor, positions: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill all but the last `positions` positions, then grow them one decode step at a time."""
    with torch.no_grad():
        cache = cell.grow(x[:, :-positions])[1] if positions < x.shape[1] else None
        outputs = []
        for t in range(x.shape[1] - positions, x.shape[1]):
            out, cache = cell.grow(x[:, t:t + 1], cache)
            outputs.append(out)
    return torch.cat(outputs, dim=1), cache


@needs_native
@pytest.mark.parametrize("rows,width", [(1, 3), (9, 3), (16, 2), (4, 4)])
def test_compiled_step_matches_tensor_path(monkeypatch, rows, width):
    torch.manual_seed(rows)
    cell = NCACell(NCAConfig(kernel_width=width)).eval()
    x = torch.randn(rows, 10, 32)
    compiled, compiled_cache = decode(cell, x, 4)
    monkeypatch.setattr(nca, "native_blocker", lambda: "switched off by the test")
    operations, operations_cache = decode(cell, x, 4)
    torch.testing.assert_close(compiled, operations, atol=1e-5, rtol=0)
    for a, b in zip(compiled_cache, operations_cache):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@needs_native
def test_compiled_step_row_invariant(cell):
    """From an empty cache every position is a decode step, so only the compiled step runs."""
    x = torch.randn(12, 6, 32)
    batch, _ = decode(cell, x, 6)
    for row in (0, 5, 11):
        alone, _ = decode(cell, x[row:row + 1], 6)
        assert torch.equal(alone[0], batch[row])


@needs_native
def test_compiled_step_rejects_float64():
    cell = NCACell(NCAConfig()).eval()
    weight, bias = cell._fused_input_layers()
    norm, second = cell.update[1], cell.update[3]
    cache = cell.empty_cache(2, device=torch.device("cpu"), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="invalid x .* pass a contiguous float32"):
        torch.ops.senab_nca.nca_grow_one(torch.zeros(2, 1, 32, dtype=torch.float64), cache, weight.t(), bias,
                                         norm.weight, norm.bias, norm.eps, second.weight, second.bias)


@needs_native
@pytest.mark.parametrize("case", ["cache transposed", "caches differ", "fused transposed", "second transposed"])
def test_compiled_step_rejects_shapes(case):
    """Shapes with the right number of values but the wrong layout are rejected, not misread."""
    cell = NCACell(NCAConfig()).eval()
    weight, bias = cell._fused_input_layers()
    norm, second = cell.update[1], cell.update[3]
    fused, second_weight = weight.t().contiguous(), second.weight
    cache = cell.empty_cache(2, device=torch.device("cpu"), dtype=torch.float32)
    if case == "cache transposed":
        cache = [entry.transpose(1, 2).contiguous() for entry in cache]
    elif case == "caches differ":
        cache[3] = torch.zeros(2, 1, 64)
    elif case == "fused transposed":
        fused = weight.contiguous()
    else:
        second_weight = second.weight.t().contiguous()
    with pytest.raises(RuntimeError, match="invalid"):
        torch.ops.senab_nca.nca_grow_one(torch.zeros(2, 1, 32), cache, fused, bias, norm.weight, norm.bias,
                                         norm.eps, second_weight, second.bias)


def test_float64_cell_skips_compiled_step():
    """The compiled step takes float32 only; other dtypes keep the tensor operations."""
    torch.manual_seed(0)
    cell = NCACell(NCAConfig()).double().eval()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    full, _ = cell.grow(x)
    stepped, _ = decode(cell, x, 3)
    torch.testing.assert_close(stepped, full[:, -3:], atol=1e-10, rtol=0)
