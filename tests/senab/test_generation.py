import pytest
import torch

from senab.generation import (
    GenerationRequest, Generator, IncrementalDetokenizer, SamplingParams, StopMatcher, contiguous_output_input,
    greedy_tokens, inverse_cdf, sample_next_token,
)
from senab.prompt import build_prompt, conversation_digest
from tests.helpers import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def prompt(tokenizer, text="Hello, world!") -> list[int]:
    return build_prompt(tokenizer, [("user", text)]).ids


@pytest.mark.parametrize("pieces, stops, emitted, stopped", [
    (["Hello wor", "ld"], ("world",), "Hello ", True),
    (["abc"], ("x",), "abc", False),
    (["ab", "c<", "|e", "nd|>tail"], ("<|end|>",), "abc", True),
    (["ab<", "|no"], ("<|end|>",), "ab<|no", False),
    (["one", " two", " three"], ("two", "three"), "one ", True),
    (["xy"], (), "xy", False),
    (["aaab"], ("aab",), "a", True),
])
def test_stop_matcher_table(pieces, stops, emitted, stopped):
    matcher = StopMatcher(stops)
    out, found = "", False
    for piece in pieces:
        text, found = matcher.push(piece)
        out += text
        if found:
            break
    if not found:
        out += matcher.flush()

    assert out == emitted
    assert found is stopped


@pytest.mark.parametrize("text", ["plain ascii", "😀 emoji 😀😀", "é combining e\u0301", "שלום עולם", "日本語"])
def test_detokenizer_never_splits_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)

    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]

    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    if text == "😀 emoji 😀😀":
        assert len(ids) > len(text.split())  # the emoji really spans several tokens


def test_generator_output_equals_decoded_tokens(tiny):
    model, tokenizer = tiny
    result = Generator(model, tokenizer).generate(
        [GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=30, temperature=0))])[0]

    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 30


def test_stop_string_never_leaks(tiny):
    model, tokenizer = tiny
    request = GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=30, temperature=0))
    full = Generator(model, tokenizer).generate([request])[0].text
    stop = full[7:10]
    assert len(stop) == 3

    stopped = Generator(model, tokenizer).generate(
        [GenerationRequest(request.prompt_ids, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))])[0]

    assert stopped.finish_reason == "stop"
    assert stopped.text == full[:full.index(stop)]
    assert stop not in stopped.text


def test_eos_finishes_with_stop(tiny):
    model, tokenizer = tiny
    request = GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=30, temperature=0))
    first = Generator(model, tokenizer).generate([request])[0].token_ids[3]

    result = Generator(model, tokenizer, eos_token_ids={first}).generate([request])[0]

    assert result.finish_reason == "stop"
    assert first not in result.token_ids


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=123)
    generator = Generator(model, tokenizer)

    a = generator.generate([GenerationRequest(prompt(tokenizer), params)])[0]
    b = generator.generate([GenerationRequest(prompt(tokenizer), params)])[0]
    c = generator.generate([GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=20, seed=124))])[0]

    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_mixed_sampling_rows_decode_as_alone(tiny):
    """Greedy rows take a batched argmax; rows with penalties or sampling pick their own tokens."""
    model, tokenizer = tiny
    generator = Generator(model, tokenizer)
    params = [SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0),
              SamplingParams(max_tokens=12, temperature=0.8, seed=7),
              SamplingParams(max_tokens=12, temperature=0, presence_penalty=-2.0)]
    requests = [GenerationRequest(prompt(tokenizer, text), p)
                for text, p in zip(["Hello", "Hello", "Tell me", "Hi there"], params)]
    alone = [generator.generate([r])[0].token_ids for r in requests]
    assert [row.token_ids for row in generator.generate(requests)] == alone
    assert alone[0] != alone[1]  # the penalty changed that row's tokens, so it was applied per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_greedy_matches_row_alone(dtype):
    """Among equal maxima the batched pick takes the first index, as a row alone does."""
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0],
                           [float("-inf"), 3.0, 1.0, 3.0],
                           [1.0, 1.0, 1.0, 1.0],
                           [-2.0, -3.0, -1.5, float("-inf")]], dtype=dtype)
    logits = torch.cat([logits, torch.randn(60, 4).to(dtype).round()])  # many ties among small integers
    alone = [sample_next_token(row, SamplingParams(temperature=0), [], None) for row in logits]
    assert greedy_tokens(logits) == alone
    assert alone[:4] == [1, 1, 0, 2]


def test_top_k_one_equals_greedy(tiny):
    model, tokenizer = tiny
    generator = Generator(model, tokenizer)
    greedy = generator.generate([GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=15, temperature=0))])
    top1 = generator.generate([GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=15, top_k=1, seed=1))])

    assert top1[0].token_ids == greedy[0].token_ids


def test_top_p_zero_keeps_the_top_token():
    logits = torch.log(torch.tensor([0.3, 0.5, 0.2]))
    seen = {sample_next_token(logits, SamplingParams(top_p=0.0), [], torch.Generator().manual_seed(i))
            for i in range(50)}

    assert seen == {1}


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {sample_next_token(logits, SamplingParams(top_p=0.7), [], torch.Generator().manual_seed(i))
            for i in range(200)}

    assert seen == {0, 1}


def test_inverse_cdf_boundaries():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])

    assert inverse_cdf(probs, 0.0) == 1
    assert inverse_cdf(probs, 0.2499) == 1
    assert inverse_cdf(probs, 0.25) == 3
    assert inverse_cdf(probs, 0.75) == 4
    assert inverse_cdf(probs, 1.0 - 2.0 ** -53) == 4
    assert inverse_cdf(probs, 1.0) == 4  # a product that rounds up to the whole sum


def test_inverse_cdf_rejects_nan():
    with pytest.raises(ValueError, match="NaN or infinity"):
        inverse_cdf(torch.tensor([0.5, float("nan")]), 0.3)


def test_sampling_frequencies_follow_probabilities():
    probs = torch.tensor([0.05, 0.0, 0.1, 0.2, 0.0, 0.15, 0.3, 0.1, 0.1, 0.0])
    logits = torch.log(probs)
    generator = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = torch.bincount(torch.tensor([
        sample_next_token(logits, SamplingParams(temperature=1.0), [], generator) for _ in range(draws)
    ]), minlength=len(probs))

    assert counts[probs == 0].sum() == 0
    # Binomial standard deviation is at most 0.0033 here, so 0.015 is over four of them.
    assert torch.allclose(counts / draws, probs, atol=0.015)


def test_penalties_lower_repeated_tokens():
    logits = torch.tensor([2.0, 1.9, 0.0])
    assert sample_next_token(logits, SamplingParams(temperature=0), [0], None) == 0
    assert sample_next_token(logits, SamplingParams(temperature=0, presence_penalty=0.5), [0], None) == 1
    assert sample_next_token(logits, SamplingParams(temperature=0, frequency_penalty=0.06), [0, 0], None) == 1


def test_cancel_finishes_row(tiny):
    model, tokenizer = tiny
    steps = list(Generator(model, tokenizer).stream(
        [GenerationRequest(prompt(tokenizer), SamplingParams(max_tokens=30, temperature=0))],
        should_cancel=lambda index: True))

    assert steps[-1][0].finish_reason == "cancelled"
    assert steps[-1][0].readout is None


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -0.1), ("temperature", 2.5),
                                           ("top_p", -0.1), ("top_p", 1.5), ("top_k", -1),
                                           ("presence_penalty", 3.0), ("stop", ("",))])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field if field != "stop" else "stop strings"):
        SamplingParams(**{field: value})


def test_turn_start_points_at_last_user_message(tokenizer):
    messages = [("system", "Be brief."), ("user", "first question"), ("assistant", "an answer"),
                ("user", "Second question")]
    built = build_prompt(tokenizer, messages)
    turn_text = tokenizer.decode(built.ids[built.turn_start:])

    assert turn_text.startswith("Second question")
    assert "first question" not in turn_text


@pytest.mark.parametrize("text", ["assistant", "user", "a", "\n", "im_start"])
def test_turn_start_with_template_like_text(tokenizer, text):
    built = build_prompt(tokenizer, [("user", "earlier"), ("assistant", "reply"), ("user", text)])
    turn_text = tokenizer.decode(built.ids[built.turn_start:])

    assert turn_text.startswith(text)
    assert turn_text.endswith("assistant\n")


def test_tiny_temperature_is_greedy():
    logits = torch.tensor([0.0, 5.0, 4.9])
    assert sample_next_token(logits, SamplingParams(temperature=1e-40), [], torch.Generator()) == 1


def test_conversation_digest_depends_on_every_message():
    base = [("user", "a"), ("assistant", "b"), ("user", "c")]
    assert conversation_digest("m", base) == conversation_digest("m", list(base))
    assert conversation_digest("m", base) != conversation_digest("m", base[:-1] + [("user", "d")])
    assert conversation_digest("m", base) != conversation_digest("m2", base)


def test_output_layer_input_is_made_contiguous_once():
    model, _ = make_tiny_llama(seed=1)
    hidden = torch.randn(3, 5, model.config.hidden_size)
    last = hidden[:, -1:, :]  # what logits_to_keep=1 passes: a strided view
    assert last.stride() != torch.empty_like(last, memory_format=torch.contiguous_format).stride()
    head = model.get_output_embeddings()
    expected = head(last.contiguous())
    contiguous_output_input(model)
    contiguous_output_input(model)
    assert len(head._forward_pre_hooks) == 1
    seen = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    torch.testing.assert_close(head(last), expected)
    handle.remove()
    assert seen == [(model.config.hidden_size, model.config.hidden_size, 1)]  # contiguous (3, 1, d)


def test_failed_add_leaves_the_batch_as_it_was(tiny, monkeypatch):
    import senab.generation as generation
    from senab.generation import DecodeBatch

    model, tokenizer = tiny
    monkeypatch.setattr(generation, "LONG_PROMPT", 12)
    generator = Generator(model, tokenizer)
    short = GenerationRequest(prompt(tokenizer)[:6], SamplingParams(max_tokens=8, temperature=0))
    long = GenerationRequest(prompt(tokenizer) * 3, SamplingParams(max_tokens=8, temperature=0))
    alone = generator.generate([short])[0].token_ids

    batch = DecodeBatch(generator)
    batch.add([short], [0])
    forward = Generator._forward

    def fail_on_long_prompts(self, input_ids, *args, **kwargs):
        if input_ids.shape[1] >= 12:
            raise RuntimeError("out of memory")  # the fault: a prefill that fails
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Generator, "_forward", fail_on_long_prompts)
    with pytest.raises(RuntimeError, match="out of memory"):
        batch.add([short, long], [1, 2])  # the short one is prefilled and joined first
    assert [row.index for row in batch.rows] == [0]
    assert batch.logits.shape[0] == 1

    tokens = []
    while batch:
        for output in batch.step():
            if output.finish_reason is not None:
                tokens = output.token_ids
    assert tokens == alone
