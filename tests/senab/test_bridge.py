import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from senab.bridge import (
    Bridge, BridgeConfig, BridgeState, CheckpointError, UnsupportedArchitecture, attach_bridge,
    freeze_base_model, load_checkpoint, lora_parameter_count, new_checkpoint,
)
from senab.generation import DecodeBatch, GenerationRequest, Generator, SamplingParams
from senab.nca import native_blocker as nca_native_blocker
from senab.prompt import build_prompt
from tests.helpers import make_tiny_llama, randomize_write_out

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture
def tiny():
    model, tokenizer = make_tiny_llama(seed=0)
    checkpoint = new_checkpoint(model.config)
    handle = attach_bridge(model, checkpoint.bridge)
    return model, tokenizer, checkpoint, handle


def prompt_ids(tokenizer, text: str) -> list[int]:
    return build_prompt(tokenizer, [("user", text)]).ids


def session(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=32).astype(np.float32)


def test_parameter_count_on_smollm2():
    bridge = Bridge(BridgeConfig.for_model(SMOLLM2_135M))
    read_in, cell, write_out, gains, set_point = 576 * 32, 17825, 2 * (32 * 192 + 192), 8, 32

    assert bridge.num_parameters() == read_in + cell + write_out + gains + set_point == 48969
    assert bridge.num_parameters() <= 64_000
    assert lora_parameter_count(SMOLLM2_135M, rank=32) == 1_474_560
    assert bridge.num_parameters() <= 0.05 * lora_parameter_count(SMOLLM2_135M, rank=32)


def test_zero_write_out_equals_base_greedy(tiny):
    model, tokenizer, _, handle = tiny
    prompt = prompt_ids(tokenizer, "What is the capital of France?")

    base = Generator(model, tokenizer).generate([GenerationRequest(prompt, GREEDY)])[0]
    bridged = Generator(model, tokenizer, handle).generate(
        [GenerationRequest(prompt, GREEDY, session=session(0))])[0]

    assert bridged.token_ids == base.token_ids
    assert len(base.token_ids) > 0
    assert bridged.readout is not None


def test_disabled_bridge_equals_base_logits(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    ids = torch.tensor([prompt_ids(tokenizer, "Hello, world!")])
    base = model(ids).logits
    state = BridgeState(checkpoint.bridge, torch.from_numpy(session(0))[None], [0])

    with handle.activate(state):
        on = model(ids).logits
    handle.enabled = False
    with handle.activate(BridgeState(checkpoint.bridge, torch.from_numpy(session(0))[None], [0])):
        off = model(ids).logits

    assert not torch.allclose(on, base)
    assert torch.equal(off, base)


def test_detach_restores_original_modules(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    assert type(model.model.layers[-1].self_attn.k_proj) is not torch.nn.Linear

    handle.detach()

    assert all(type(layer.self_attn.k_proj) is torch.nn.Linear for layer in model.model.layers)
    assert all(type(layer.self_attn.v_proj) is torch.nn.Linear for layer in model.model.layers)


def test_incremental_decoding_equals_full_recompute(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    bridge = checkpoint.bridge
    prompt = build_prompt(tokenizer, [("user", "Numbers: 1 2 3"), ("assistant", "4 5"), ("user", "Hello, world!")])
    s = torch.from_numpy(session(3))[None]
    result = Generator(model, tokenizer, handle).generate(
        [GenerationRequest(prompt.ids, SamplingParams(max_tokens=20, temperature=0), session=s[0].numpy(),
                           turn_start=prompt.turn_start)])[0]
    tokens = prompt.ids + result.token_ids

    with torch.no_grad():
        full_state = BridgeState(bridge, s, [prompt.turn_start])
        with handle.activate(full_state):
            full_logits = model(torch.tensor([tokens[:-1]])).logits[0]  # (T-1, V)

        step_state = BridgeState(bridge, s, [prompt.turn_start])
        cache = DynamicCache(config=model.config)
        with handle.activate(step_state):
            out = model(torch.tensor([prompt.ids]), cache=cache, use_cache=True)
            step_logits = [out.logits[0, -1]]
            for token in result.token_ids[:-1]:
                out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
                step_logits.append(out.logits[0, -1])

    expected = full_logits[len(prompt.ids) - 1:]
    torch.testing.assert_close(torch.stack(step_logits), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(step_state.readout(), full_state.readout(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.readout, full_state.readout()[0].numpy(), atol=1e-5)
    assert full_state.readout_count.item() == len(tokens) - 1 - prompt.turn_start


def test_batch_of_two_sessions_matches_each_alone(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    generator = Generator(model, tokenizer, handle)
    first = GenerationRequest(prompt_ids(tokenizer, "What is the capital of France?"), GREEDY, session=session(1))
    second = GenerationRequest(prompt_ids(tokenizer, "Hi"), GREEDY, session=session(2))

    alone = [generator.generate([request])[0] for request in (first, second)]
    together = generator.generate([first, second])

    for single, batched in zip(alone, together):
        assert batched.token_ids == single.token_ids
        np.testing.assert_allclose(batched.readout, single.readout, atol=1e-5)
    assert alone[0].token_ids != alone[1].token_ids


def test_batch_mixes_base_and_bridge_rows(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    prompt = prompt_ids(tokenizer, "Hello, world!")

    base = Generator(model, tokenizer).generate([GenerationRequest(prompt, GREEDY)])[0]
    mixed = Generator(model, tokenizer, handle).generate(
        [GenerationRequest(prompt, GREEDY), GenerationRequest(prompt, GREEDY, session=session(4))])

    assert mixed[0].token_ids == base.token_ids
    assert mixed[0].readout is None
    assert mixed[1].readout is not None


def test_sessions_change_bridged_output(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    ids = torch.tensor([prompt_ids(tokenizer, "Hello")])
    logits = []
    for seed in (5, 6):
        with torch.no_grad(), handle.activate(BridgeState(checkpoint.bridge, torch.from_numpy(session(seed))[None], [0])):
            logits.append(model(ids).logits)

    assert not torch.allclose(logits[0], logits[1])


def test_unsupported_architecture_rejected():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    config.model_type = "gpt2"

    with pytest.raises(UnsupportedArchitecture, match="llama"):
        BridgeConfig.for_model(config)


def test_bridged_layers_out_of_range():
    with pytest.raises(ValueError, match="bridged_layers"):
        BridgeConfig(hidden_size=64, kv_width=32, num_model_layers=4, bridged_layers=5)


def test_freeze_leaves_only_bridge_trainable(tiny):
    model, _, checkpoint, _ = tiny
    freeze_base_model(model, checkpoint.bridge)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable += sum(p.numel() for p in checkpoint.bridge.parameters()
                     if p.requires_grad and not any(p is q for q in model.parameters()))

    assert trainable == checkpoint.bridge.num_parameters()


def test_checkpoint_round_trip(tmp_path, tiny):
    _, _, checkpoint, _ = tiny
    randomize_write_out(checkpoint.bridge)
    checkpoint.checkpoint_id = ""
    checkpoint.__post_init__()
    checkpoint.save(tmp_path)

    loaded = load_checkpoint(tmp_path)

    assert loaded.checkpoint_id == checkpoint.checkpoint_id
    for name, tensor in checkpoint.bridge.state_dict().items():
        assert torch.equal(loaded.bridge.state_dict()[name], tensor), name
    assert loaded.homeostasis == checkpoint.homeostasis
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["trainable_parameters"] == checkpoint.bridge.num_parameters()


def test_new_checkpoint_is_deterministic(tiny):
    model = tiny[0]
    assert new_checkpoint(model.config).checkpoint_id == new_checkpoint(model.config).checkpoint_id
    assert new_checkpoint(model.config).checkpoint_id != new_checkpoint(model.config, seed=1).checkpoint_id


@pytest.mark.parametrize("damage", ["missing_manifest", "bad_json", "missing_weights", "tampered_weights"])
def test_checkpoint_damage_rejected(tmp_path, tiny, damage):
    _, _, checkpoint, _ = tiny
    checkpoint.save(tmp_path)
    if damage == "missing_manifest":
        (tmp_path / "manifest.json").unlink()
    elif damage == "bad_json":
        (tmp_path / "manifest.json").write_text("{not json")
    elif damage == "missing_weights":
        (tmp_path / "bridge.safetensors").unlink()
    else:
        other = new_checkpoint(tiny[0].config, seed=7)
        other.save(tmp_path / "other")
        (tmp_path / "bridge.safetensors").write_bytes((tmp_path / "other" / "bridge.safetensors").read_bytes())

    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_checkpoint(tmp_path)


def run_staggered(generator, requests, joins):
    """Decode `requests` in one DecodeBatch, request i joining before step joins[i]."""
    batch = DecodeBatch(generator)
    results = {i: [] for i in range(len(requests))}
    finished = {}
    step = 0
    while len(finished) < len(requests):
        joining = [i for i, at in enumerate(joins) if at == step]
        if joining:
            batch.add([requests[i] for i in joining], joining)
        if batch:
            for output in batch.step():
                results[output.index].append(output.text)
                if output.finish_reason is not None:
                    finished[output.index] = output
        step += 1
    return finished


def test_staggered_joins_decode_as_alone(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    generator = Generator(model, tokenizer, handle)
    requests = [
        GenerationRequest(prompt_ids(tokenizer, "What is the capital of France?"), GREEDY, session=session(1)),
        GenerationRequest(prompt_ids(tokenizer, "Hi"), GREEDY, session=session(2)),
        GenerationRequest(prompt_ids(tokenizer, "Tell me a long story about the sea and the wind"), GREEDY),
        GenerationRequest(prompt_ids(tokenizer, "Hello, world!"), dataclasses.replace(GREEDY, max_tokens=3),
                          session=session(3)),
    ]
    alone = [generator.generate([request])[0] for request in requests]

    # Rows join at different steps, one at a time and two at once, into a batch whose rows
    # have longer or shorter histories. The short row leaves while the others keep going.
    for joins in ([0, 3, 5, 5], [4, 0, 1, 2], [0, 0, 0, 0]):
        together = run_staggered(generator, requests, joins)
        for i, single in enumerate(alone):
            assert together[i].token_ids == single.token_ids, (joins, i)
            assert together[i].finish_reason == single.finish_reason
            if single.readout is None:
                assert together[i].readout is None
            else:
                np.testing.assert_allclose(together[i].readout, single.readout, atol=1e-5)


def test_base_rows_join_bridged_batch_unchanged(tiny):
    model, tokenizer, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    base_prompt = prompt_ids(tokenizer, "Hello, world!")
    base = Generator(model, tokenizer).generate([GenerationRequest(base_prompt, GREEDY)])[0]
    generator = Generator(model, tokenizer, handle)
    bridged = GenerationRequest(prompt_ids(tokenizer, "Hi there"), GREEDY, session=session(7))

    for joins in ([0, 2], [2, 0]):
        together = run_staggered(generator, [GenerationRequest(base_prompt, GREEDY), bridged], joins)
        assert together[0].token_ids == base.token_ids
        assert together[0].readout is None
        assert together[1].token_ids == generator.generate([bridged])[0].token_ids


def test_untrained_checkpoint_for_a_shallow_model():
    from senab.bridge import checkpoint_for_model

    model, tokenizer = make_tiny_llama(seed=0, layers=2)
    checkpoint, origin = checkpoint_for_model("tiny-2-layers", model.config)
    assert origin == "untrained"
    assert checkpoint.bridge.config.bridged_layers == 2
    handle = attach_bridge(model, checkpoint.bridge)
    request = GenerationRequest(prompt_ids(tokenizer, "Hi"), GREEDY, session=session(1))
    assert Generator(model, tokenizer, handle).generate([request])[0].completion_tokens > 0


def test_unsupported_family_is_a_checkpoint_error():
    from senab.bridge import checkpoint_for_model

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100)
    config.model_type = "gpt2"
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        checkpoint_for_model("gpt2-like", config)


def test_bridge_for_another_model_shape_is_rejected():
    model, _ = make_tiny_llama(seed=0)
    other = new_checkpoint(SMOLLM2_135M)
    with pytest.raises(CheckpointError, match="built for 30 layers, hidden size 576") as error:
        attach_bridge(model, other.bridge)
    assert "the model has 4, 64 and 32" in str(error.value)


needs_native_nca = pytest.mark.skipif(nca_native_blocker() is not None,
                                      reason="the compiled automaton step does not build here")


def run_read_in(handle, bridge, dtype: torch.dtype, steps: int = 6) -> tuple[list[torch.Tensor], BridgeState]:
    """Prefill 6 positions of 5 rows through the read-in hook, then run `steps` decode steps; return deltas, state."""
    generator = torch.Generator().manual_seed(0)
    sessions = torch.randn(5, 32, generator=generator)
    # Rows 2 and 4 start their turn after the prefill; row 2 has the bridge off.
    state = BridgeState(bridge, sessions, [0, 3, 8, 0, 11], row_enabled=[True, True, False, True, True])
    deltas = []
    with torch.no_grad(), handle.activate(state):
        state.valid = torch.ones(5, 6, dtype=torch.bool)
        handle._read_in(None, (torch.randn(5, 6, 64, generator=generator).to(dtype),), {})
        state.valid = None
        for _ in range(steps):
            handle._read_in(None, (torch.randn(5, 1, 64, generator=generator).to(dtype),), {})
            deltas.append(torch.cat([state.delta_k, state.delta_v], -1))
    return deltas, state


@needs_native_nca
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_bridge_step_matches_python_path(tiny, dtype, monkeypatch):
    _, _, checkpoint, handle = tiny
    randomize_write_out(checkpoint.bridge)
    bridge = checkpoint.bridge.eval()
    served = []
    compiled_step = Bridge.decode_step
    monkeypatch.setattr(Bridge, "decode_step",
                        lambda self, hidden, state: served.append(compiled_step(self, hidden, state)) or served[-1])
    compiled_deltas, compiled = run_read_in(handle, bridge, dtype)
    assert len(served) == 6 and all(deltas is not None for deltas in served)
    monkeypatch.setattr(Bridge, "decode_step", lambda self, hidden, state: None)
    python_deltas, python = run_read_in(handle, bridge, dtype)

    # bfloat16 deltas may round one step of bfloat16 (2^-8 of 0.5) apart.
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3
    for step, (a, b) in enumerate(zip(compiled_deltas, python_deltas)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=tolerance, rtol=0, msg=f"step {step}")
    assert not compiled_deltas[-1][:, 2].any()  # the row with the bridge off gets no delta
    for a, b in zip(compiled.cache, python.cache):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(compiled.positions, python.positions)
    assert torch.equal(compiled.readout_count, python.readout_count)
    assert compiled.readout_count.tolist() == [12, 9, 4, 12, 1]
    torch.testing.assert_close(compiled.readout_sum, python.readout_sum, atol=1e-5, rtol=0)


@needs_native_nca
def test_compiled_bridge_step_rejects_bad_counters(tiny):
    _, _, checkpoint, _ = tiny
    bridge = checkpoint.bridge.eval()
    state = BridgeState(bridge, torch.zeros(2, 32), [0, 0])
    state.cache = bridge.cell.empty_cache(2, device=torch.device("cpu"), dtype=torch.float32)
    state.positions = state.positions.to(torch.int32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid positions or turn_starts"):
        bridge.decode_step(torch.zeros(2, 1, 64), state)
    assert state.readout_count.tolist() == [0, 0]
