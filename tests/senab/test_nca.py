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
