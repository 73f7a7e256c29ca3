"""Cached prompt prefixes below the bridge (senab.prefix) against plain prefills."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from senab.bridge import attach_bridge, new_checkpoint
from senab.generation import DecodeBatch, GenerationRequest, Generator, SamplingParams
from senab.prefix import PrefixCache, PrefixEntry, PrefixPrefill
from senab.prompt import build_prompt
from tests.helpers import make_tiny_llama, randomize_write_out

SYSTEM = "You are a helpful assistant who answers briefly."
QUESTIONS = ["Hello there", "What is the sea made of, and why is it salty?", "Hi", "Name three birds."]


@pytest.fixture
def bridged():
    """A 6-layer tiny Llama in float32 with a bridge over its last 4 layers (random write-out)."""
    model, tokenizer = make_tiny_llama(seed=0, layers=6)
    checkpoint = new_checkpoint(model.config)
    randomize_write_out(checkpoint.bridge)
    handle = attach_bridge(model, checkpoint.bridge)
    return model, tokenizer, handle


def requests(tokenizer, questions=QUESTIONS, tokens: int = 8, salt: str = "") -> list[GenerationRequest]:
    """One request per question after the same system prompt; the second row runs without its session."""
    rng = np.random.default_rng(0)
    out = []
    for i, question in enumerate(questions):
        prompt = build_prompt(tokenizer, [("system", SYSTEM), ("user", question)])
        session = None if i == 1 else rng.normal(size=32).astype(np.float32)
        out.append(GenerationRequest(prompt.ids, SamplingParams(max_tokens=tokens, temperature=0), session=session,
                                     turn_start=prompt.turn_start, cache_salt=salt))
    return out


def generators(bridged) -> tuple[Generator, Generator, PrefixCache]:
    """Return a generator without a prefix cache, one with a 1 MiB cache, and that cache."""
    model, tokenizer, handle = bridged
    cache = PrefixCache(1 << 20)
    return (Generator(model, tokenizer, handle, eos_token_ids=set()),
            Generator(model, tokenizer, handle, eos_token_ids=set(), prefix_cache=cache), cache)


def run(generator: Generator, batch_requests: list[GenerationRequest]):
    """Decode greedily as one batch; return each step's logits and each row's output."""
    batch = DecodeBatch(generator)
    batch.add(batch_requests, list(range(len(batch_requests))))
    logits, finished = [], {}
    while batch.rows:
        logits.append(batch.logits.clone())
        for output in batch.step():
            if output.finish_reason is not None:
                finished[output.index] = output
    return logits, [finished[i] for i in range(len(batch_requests))]


def assert_same_outputs(plain, cached) -> None:
    plain_logits, plain_rows = plain
    cached_logits, cached_rows = cached
    assert len(plain_logits) == len(cached_logits)
    for step, (a, b) in enumerate(zip(plain_logits, cached_logits)):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5, msg=f"step {step}")
    for a, b in zip(plain_rows, cached_rows):
        assert b.token_ids == a.token_ids
        if a.readout is None:
            assert b.readout is None
        else:
            np.testing.assert_allclose(b.readout, a.readout, atol=1e-5, rtol=1e-5)


def test_cached_prefix_gives_the_plain_prefill(bridged):
    _, tokenizer, _ = bridged
    plain, cached, cache = generators(bridged)
    batch_requests = requests(tokenizer)

    run(cached, batch_requests[:1])  # computes and stores the system prompt's prefix
    assert len(cache) == 1
    assert cache.stats.hit_tokens == 0
    turn_start = batch_requests[0].turn_start
    hits_before = cache.stats.hit_tokens

    # Rows of different lengths (so with padding), one of them without the bridge.
    assert_same_outputs(run(plain, batch_requests), run(cached, batch_requests))
    assert cache.stats.hit_tokens - hits_before == turn_start * len(batch_requests)


def test_cached_prefix_matches_a_longer_conversation(bridged):
    _, tokenizer, _ = bridged
    plain, cached, cache = generators(bridged)
    run(cached, requests(tokenizer)[:1])
    first = next(iter(cache._entries.values()))

    # The second turn's prompt starts with the first one's prefix, and caches its own longer one.
    prompt = build_prompt(tokenizer, [("system", SYSTEM), ("user", QUESTIONS[0]), ("assistant", "Hi! How can I help?"),
                                      ("user", QUESTIONS[3])])
    later = GenerationRequest(prompt.ids, SamplingParams(max_tokens=8, temperature=0),
                              session=np.full(32, 0.3, np.float32), turn_start=prompt.turn_start)
    hits_before = cache.stats.hit_tokens
    assert_same_outputs(run(plain, [later]), run(cached, [later]))
    assert cache.stats.hit_tokens - hits_before == first.length
    assert sorted(entry.length for entry in cache._entries.values()) == [first.length, prompt.turn_start]

    # A third request finds the longer prefix.
    hits_before = cache.stats.hit_tokens
    assert_same_outputs(run(plain, [later]), run(cached, [later]))
    assert cache.stats.hit_tokens - hits_before == prompt.turn_start


def test_prefixed_row_joins_a_running_batch(bridged):
    _, tokenizer, _ = bridged
    plain, cached, _ = generators(bridged)
    first, *others = requests(tokenizer, tokens=10)
    run(cached, [first])

    def joined(generator: Generator) -> list[list[int]]:
        batch = DecodeBatch(generator)
        batch.add([first], [0])
        tokens: dict[int, list[int]] = {}
        steps = 0
        while batch.rows:
            for output in batch.step():
                if output.finish_reason is not None:
                    tokens[output.index] = output.token_ids
            steps += 1
            if steps == 3:
                batch.add(others, [1, 2, 3])
        return [tokens[i] for i in range(4)]

    assert joined(cached) == joined(plain)


def test_salts_do_not_share_prefixes(bridged):
    _, tokenizer, _ = bridged
    _, cached, cache = generators(bridged)
    run(cached, requests(tokenizer, salt="tenant-a")[:1])

    run(cached, requests(tokenizer, salt="tenant-b")[:1])

    assert cache.stats.hit_tokens == 0
    assert sorted(salt for salt, _ in cache._entries) == ["tenant-a", "tenant-b"]


def test_changed_weights_drop_the_entries(bridged):
    model, tokenizer, _ = bridged
    plain, cached, cache = generators(bridged)
    batch_requests = requests(tokenizer)
    run(cached, batch_requests[:1])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # below the bridge

    assert_same_outputs(run(plain, batch_requests), run(cached, batch_requests))
    assert cache.stats.hit_tokens == 0


def test_hook_below_the_bridge_sees_every_token(bridged):
    model, tokenizer, _ = bridged
    _, cached, cache = generators(bridged)
    batch_requests = requests(tokenizer)
    run(cached, batch_requests[:1])
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    try:
        assert "model.layers.0 has forward hooks" == cached.prefix_blocker()
        run(cached, batch_requests[1:2])
    finally:
        hook.remove()
    # The prefill ran the whole prompt through the layer: no prefix was reused.
    assert seen[0] == len(batch_requests[1].prompt_ids)
    assert cache.stats.hit_tokens == 0


def test_bridge_over_every_layer_caches_nothing():
    model, tokenizer = make_tiny_llama(seed=0, layers=4)
    handle = attach_bridge(model, new_checkpoint(model.config).bridge)  # 4 bridged layers of 4
    cache = PrefixCache(1 << 20)
    generator = Generator(model, tokenizer, handle, eos_token_ids=set(), prefix_cache=cache)

    assert "spans every layer" in generator.prefix_blocker()
    run(generator, requests(tokenizer)[:2])
    assert len(cache) == 0


def entry(salt: str, length: int, nbytes: int) -> PrefixEntry:
    # Keys and values empty, the hidden state sized to `nbytes` in float32.
    return PrefixEntry(salt, tuple(range(length)), [], [], torch.zeros(nbytes // 4))


def test_least_recently_used_entry_leaves_first():
    cache = PrefixCache(max_bytes=1000, min_tokens=4)
    cache.insert(entry("", 4, 400))
    cache.insert(entry("", 5, 400))
    assert cache.lookup("", list(range(10)), limit=4).length == 4  # the 4-token entry is used last

    cache.insert(entry("", 6, 400))

    assert sorted(e.length for e in cache._entries.values()) == [4, 6]
    assert cache.stats.evictions == 1
    assert cache.stats.bytes == 800


def test_entry_larger_than_the_cache_is_not_kept(caplog):
    cache = PrefixCache(max_bytes=100)
    with caplog.at_level("INFO", logger="senab.prefix"):
        cache.insert(entry("", 20, 400))
        cache.insert(entry("", 21, 400))
    assert len(cache) == 0
    assert caplog.text.count("is larger than the prefix cache") == 1


def test_lookup_takes_the_longest_prefix_within_the_limit():
    cache = PrefixCache(max_bytes=10_000, min_tokens=4)
    for length in (4, 8, 12):
        cache.insert(entry("", length, 40))
    prompt = list(range(20))

    assert cache.lookup("", prompt, limit=11).length == 8
    assert cache.lookup("", [0, 1, 2, 3, 99] + prompt[5:], limit=19).length == 4
    assert cache.lookup("other", prompt, limit=19) is None


@pytest.mark.parametrize("max_bytes, min_tokens, message", [(-1, 16, "Invalid prefix cache size of -1 bytes"),
                                                             (100, 0, "Invalid min_tokens 0")])
def test_invalid_cache_settings_are_rejected(max_bytes, min_tokens, message):
    with pytest.raises(ValueError, match=message):
        PrefixCache(max_bytes, min_tokens)


def test_failed_prefix_prefill_reruns_prompts(bridged, monkeypatch, caplog):
    _, tokenizer, _ = bridged
    plain, cached, cache = generators(bridged)
    batch_requests = requests(tokenizer)
    run(cached, batch_requests[:1])

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(PrefixPrefill, "__call__", broken)
    assert_same_outputs(run(plain, batch_requests), run(cached, batch_requests))
    assert "a prefill from cached prefixes failed" in caplog.text
    assert "injected fault" in caplog.text
    assert "failed" in cached.prefix_blocker()
    assert len(cache) == 0
