import pytest
import torch

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
