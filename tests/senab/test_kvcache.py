import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from senab.kvcache import MIN_SPARE, GrowingLayer, new_kv_cache
from tests.helpers import make_tiny_llama


def test_growing_layer_matches_concatenation():
    growing, reference = GrowingLayer(), DynamicLayer()
    for size in (7, 1, 1, 40, 1, 3):
        k, v = torch.randn(2, 3, size, 8), torch.randn(2, 3, size, 8)
        got = growing.update(k, v)
        expected = reference.update(k, v)
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        assert growing.get_seq_length() == reference.get_seq_length()


def test_growing_layer_keeps_bounded_spare_capacity():
    layer = GrowingLayer()
    buffers = set()
    for _ in range(1000):
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        buffers.add(layer._key_buffer.data_ptr())
        assert layer._key_buffer.shape[-2] <= 1000 + 1000 // 4 + MIN_SPARE
    assert layer.get_seq_length() == 1000
    assert len(buffers) < 30  # a copy per quarter-length of growth, not one per step


def test_growing_layer_after_row_selection_and_assignment():
    growing, reference = GrowingLayer(), DynamicLayer()
    for layer in (growing, reference):
        torch.manual_seed(0)
        layer.update(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.keys = torch.cat([torch.zeros(2, 2, 1, 4), layer.keys], dim=-2)  # left padding, as a merge does
        layer.values = torch.cat([torch.zeros(2, 2, 1, 4), layer.values], dim=-2)
        layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert torch.equal(growing.keys, reference.keys)
    assert torch.equal(growing.values, reference.values)
    assert growing.get_seq_length() == 7


def test_model_logits_equal_with_growing_cache():
    model, _ = make_tiny_llama(seed=2)
    ids = torch.randint(3, 100, (2, 9))
    logits = {}
    for name, cache in (("growing", new_kv_cache(model.config)), ("dynamic", DynamicCache(config=model.config))):
        with torch.inference_mode():
            first = model(input_ids=ids[:, :6], cache=cache, use_cache=True).logits
            steps = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits
                     for t in range(6, 9)]
        logits[name] = torch.cat([first, *steps], dim=1)
    assert all(isinstance(layer, GrowingLayer) for layer in new_kv_cache(model.config).layers)
    torch.testing.assert_close(logits["growing"], logits["dynamic"], atol=1e-6, rtol=0)


def test_growing_layer_left_padding_with_spare_capacity():
    # A batch merge assigns the padded keys first and reads the values after that, while
    # the value buffer still has spare positions past its length.
    growing, reference = GrowingLayer(), DynamicLayer()
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    for layer in (growing, reference):
        layer.update(k, v)
        layer.keys = torch.cat([torch.zeros(1, 2, 3, 4), layer.keys], dim=-2)
        layer.values = torch.cat([torch.zeros(1, 2, 3, 4), layer.values], dim=-2)
    assert growing._value_buffer.shape[-2] == 8
    assert torch.equal(growing.values, reference.values)
    assert torch.equal(growing.keys, reference.keys)


def test_growing_layer_reserve_and_advance_match_update():
    """A caller that writes the new position itself (the compiled decode step) gets what `update` gives."""
    growing, reference = GrowingLayer(), GrowingLayer()
    prompt = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    growing.update(*prompt)
    reference.update(*prompt)
    for step in range(MIN_SPARE + 10):  # past the spare capacity, so the buffers grow once
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        keys, values, position = growing.reserve((2, 3, 4), k)
        assert position == 5 + step
        assert growing.get_seq_length() == position  # not counted before `advance`
        keys[:, :, position].copy_(k[:, :, 0])
        values[:, :, position].copy_(v[:, :, 0])
        growing.advance()
        expected = reference.update(k, v)
        assert torch.equal(growing.keys, expected[0])
        assert torch.equal(growing.values, expected[1])


def test_growing_layer_reserve_starts_an_empty_layer():
    layer = GrowingLayer()
    like = torch.zeros((), dtype=torch.bfloat16)
    keys, values, position = layer.reserve((3, 2, 8), like)
    assert position == 0
    assert keys.shape == values.shape == (3, 2, MIN_SPARE + 1, 8)
    assert keys.dtype == torch.bfloat16


def test_growing_layer_advance_without_reserve_raises():
    layer = GrowingLayer()
    with pytest.raises(RuntimeError, match="call reserve before advance"):
        layer.advance()
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()  # exactly full, as after a merge
    with pytest.raises(RuntimeError, match="no room for position 3"):
        layer.advance()
    assert layer.get_seq_length() == 3
