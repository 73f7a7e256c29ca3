"""The Llama decode step (senab.fastdecode) computes what the model's forward call computes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import sdpa_attention

import senab.fastdecode as fastdecode
import senab.packed as packed
import senab.quant as quant
from senab.bridge import BridgeHandle, attach_bridge, new_checkpoint
from senab.fastdecode import LlamaDecodeStep
from senab.generation import DecodeBatch, GenerationRequest, Generator, SamplingParams
from senab.prompt import build_prompt
from senab.quant import quantize_model
from tests.helpers import make_tiny_llama, make_tiny_tokenizer, randomize_write_out
from tests.senab.test_quant import snap_to_q4_1

PROMPTS = ["Hello there", "Tell me a long story about the sea", "Hi"]


@pytest.fixture(autouse=True)
def padded_attention_path(monkeypatch):
    """Run the forward call's attention as for a padded batch, as the step does (see senab.fastdecode).

    Without a mask transformers lets the kernel share key and value heads (`enable_gqa`),
    which rounds differently; `test_lone_row_differs_only_by_gqa_rounding` covers that case.
    The compiled attention rounds differently too, so these tests keep PyTorch's; the
    `test_native_attention_*` tests cover it.
    """
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa",
                        lambda mask, key, value: os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1")
    monkeypatch.setattr(fastdecode, "attention_kernel_blocker", lambda dtype=None: "kept off by the test")


# Each dtype's compiled attention: (dtype, largest error against float64 for outputs below 1,
# its head-size multiple). bfloat16: half a bfloat16 step plus float32 sums.
KERNEL_CASES = [
    pytest.param(torch.bfloat16, 2 ** -8, 32, id="bfloat16", marks=pytest.mark.skipif(
        fastdecode.attention_kernel_blocker(torch.bfloat16) is not None,
        reason=f"no compiled bfloat16 attention here: {fastdecode.attention_kernel_blocker(torch.bfloat16)}")),
    pytest.param(torch.float32, 1e-5, 8, id="float32", marks=pytest.mark.skipif(
        fastdecode.attention_kernel_blocker(torch.float32) is not None,
        reason=f"no compiled float32 attention here: {fastdecode.attention_kernel_blocker(torch.float32)}")),
]


def native_attention(query, key, value, mask, scale=0.125):
    kernel = fastdecode.ATTENTION_KERNELS[query.dtype]
    return fastdecode._operator(kernel.operator)(query, key, value, mask, scale)


@pytest.mark.parametrize("dtype, tolerance, multiple", KERNEL_CASES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_native_attention_matches_float64(rows, dtype, tolerance, multiple):
    """Against float64 attention, with key and value as views into a longer cache, masked and not."""
    generator = torch.Generator().manual_seed(rows)
    query = torch.randn(rows, 3, 3, 64, generator=generator).to(dtype)
    cache = torch.randn(2, rows, 3, 90, 64, generator=generator).to(dtype)
    key, value = cache[0, :, :, :70], cache[1, :, :, :70]
    mask = torch.ones(rows, 1, 1, 70, dtype=torch.bool)
    mask[0, ..., :9] = False
    for attention_mask in (None, mask):
        out = native_attention(query, key, value, attention_mask)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query.double(), key.double(), value.double(), attn_mask=attention_mask, scale=0.125)
        assert out.dtype == dtype
        assert out.shape == query.shape
        assert (out.double() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("dtype, tolerance, multiple", KERNEL_CASES)
@pytest.mark.parametrize("positions", [1, 15, 16, 17, 33])
def test_native_attention_any_length(positions, dtype, tolerance, multiple):
    """Lengths around the 16 positions the bfloat16 kernel scores at once; a row with every position masked gives 0."""
    generator = torch.Generator().manual_seed(positions)
    query = torch.randn(3, 3, 3, 64, generator=generator).to(dtype)
    key, value = (torch.randn(3, 3, positions, 64, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(3, 1, 1, positions, dtype=torch.bool)
    mask[1, ..., : positions - 1] = False  # only the last position
    mask[2] = False
    out = native_attention(query, key, value, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[:2].double(), key[:2].double(), value[:2].double(), attn_mask=mask[:2], scale=0.125)
    assert (out[:2].double() - expected).abs().max() <= tolerance
    assert not out[2].any()


@pytest.mark.parametrize("dtype, tolerance, multiple", KERNEL_CASES)
@pytest.mark.parametrize("where", [0, 5, 16, 19])
def test_native_attention_keeps_nan(where, dtype, tolerance, multiple):
    """A NaN in one key reaches the output of its row and head, as in PyTorch's attention."""
    generator = torch.Generator().manual_seed(where)
    query = torch.randn(2, 3, 3, 64, generator=generator).to(dtype)
    key, value = (torch.randn(2, 3, 20, 64, generator=generator).to(dtype) for _ in range(2))
    key[1, 2, where, 7] = float("nan")
    out = native_attention(query, key, value, None)
    assert out[1, 2].isnan().all()
    assert not out[0].isnan().any()
    assert not out[1, :2].isnan().any()


@pytest.mark.parametrize("dtype, tolerance, multiple", KERNEL_CASES)
def test_native_attention_row_invariant_and_masked(dtype, tolerance, multiple):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(16, 3, 3, 64, generator=generator).to(dtype)
    key, value = (torch.randn(16, 3, 50, 64, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(16, 1, 1, 50, dtype=torch.bool)
    mask[4, ..., :20] = False
    batch = native_attention(query, key, value, mask)
    for row in (0, 4, 15):
        alone = native_attention(query[row:row + 1], key[row:row + 1], value[row:row + 1], mask[row:row + 1])
        assert torch.equal(alone[0], batch[row])
    # Masked positions do not count, whatever they hold.
    changed = key.clone()
    changed[4, :, :20] = 100
    assert torch.equal(native_attention(query, changed, value, mask)[4], batch[4])


@pytest.mark.parametrize("dtype, tolerance, multiple", KERNEL_CASES)
def test_native_attention_rejects_bad_input(dtype, tolerance, multiple):
    query = torch.zeros(2, 3, 3, 64, dtype=dtype)
    key = torch.zeros(2, 3, 10, 64, dtype=dtype)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(RuntimeError, match=f"pass {name}"):
        native_attention(query, key.to(other), key.to(other), None)
    with pytest.raises(RuntimeError, match="do not match query"):
        native_attention(query, key[:1], key[:1], None)
    with pytest.raises(RuntimeError, match="invalid mask"):
        native_attention(query, key, key, torch.ones(2, 1, 1, 9, dtype=torch.bool))
    odd = multiple + multiple // 2 if multiple > 8 else 12
    with pytest.raises(RuntimeError, match=f"unsupported head size {odd}"):
        native_attention(query[..., :odd], key[..., :odd], key[..., :odd], None)


@pytest.mark.parametrize("dtype, tolerance, multiple", KERNEL_CASES)
@pytest.mark.parametrize("bridged", [False, True], ids=["base", "bridge"])
def test_native_attention_step_close_to_forward_call(bridged, dtype, tolerance, multiple, monkeypatch):
    """With the compiled attention, a step differs from the forward call only by rounding."""
    monkeypatch.setattr(fastdecode, "attention_kernel_blocker",
                        lambda kind=torch.bfloat16: None if kind == dtype else "kept off by the test")
    model, tokenizer = wide_tiny_llama()
    model.to(dtype)
    fast, slow, _ = generators(model, tokenizer, bridged)
    assert dtype in fast.decode_step.native_attention
    requests = requests_for(tokenizer, sessions=bridged)
    fast_logits = step_logits(fast, requests[:2], join=requests[2])
    slow_logits = step_logits(slow, requests[:2], join=requests[2])
    assert len(fast_logits) == len(slow_logits) > 3
    assert not all(torch.equal(a, b) for a, b in zip(fast_logits, slow_logits))  # it did run
    relative = 0.02 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(fast_logits, slow_logits):
        assert (a.float() - b.float()).abs().max() <= relative * b.float().abs().max()


def generators(model, tokenizer, bridged: bool) -> tuple[Generator, Generator, BridgeHandle | None]:
    """Return a generator with the decode step, one with the forward call, and the bridge (random write-out)."""
    handle = None
    if bridged:
        checkpoint = new_checkpoint(model.config)
        randomize_write_out(checkpoint.bridge)
        handle = attach_bridge(model, checkpoint.bridge)
    fast = Generator(model, tokenizer, handle, eos_token_ids=set())
    slow = Generator(model, tokenizer, handle, eos_token_ids=set(), fast_decode=False)
    return fast, slow, handle


def step_logits(generator: Generator, requests: list[GenerationRequest], join: GenerationRequest | None = None
                ) -> list[torch.Tensor]:
    """Decode `requests` greedily as one batch (`join` joins at the third step), and return every step's logits."""
    batch = DecodeBatch(generator)
    batch.add(requests, list(range(len(requests))))
    logits = []
    while batch.rows:
        logits.append(batch.logits.clone())
        batch.step()
        if len(logits) == 3 and join is not None:
            batch.add([join], [len(requests)])
    return logits


def requests_for(tokenizer, sessions: bool, tokens: int = 12) -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    out = []
    for i, text in enumerate(PROMPTS):
        prompt = build_prompt(tokenizer, [("user", text)])
        # The middle row runs without its session, so the bridge is switched off for one row.
        session = rng.normal(size=32).astype(np.float32) if sessions and i != 1 else None
        out.append(GenerationRequest(prompt.ids, SamplingParams(max_tokens=tokens, temperature=0),
                                     session=session, turn_start=prompt.turn_start))
    return out


def assert_same_steps(fast: list[torch.Tensor], slow: list[torch.Tensor]) -> None:
    assert len(fast) == len(slow) > 3
    for step, (a, b) in enumerate(zip(fast, slow)):
        assert torch.equal(a, b), f"step {step}: largest difference {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bridged", [False, True], ids=["base", "bridge"])
def test_step_equals_forward_call(dtype, bridged):
    model, tokenizer = make_tiny_llama(seed=0)
    model.to(dtype)
    fast, slow, handle = generators(model, tokenizer, bridged)
    assert fast.decode_step is not None
    assert slow.decode_step is None
    requests = requests_for(tokenizer, sessions=bridged)
    # One row alone (no padding mask), then a left-padded batch that a row joins mid-way.
    assert_same_steps(step_logits(fast, requests[1:2]), step_logits(slow, requests[1:2]))
    assert_same_steps(step_logits(fast, requests[:2], join=requests[2]),
                      step_logits(slow, requests[:2], join=requests[2]))
    if bridged:
        # The readouts, which the server commits to the session, agree too.
        a, b = fast.generate(requests), slow.generate(requests)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        for x, y in zip(a, b):
            assert (x.readout is None) == (y.readout is None)
            if x.readout is not None:
                assert np.array_equal(x.readout, y.readout)


@pytest.mark.skipif(fastdecode.layer_ops_blocker() is not None,
                    reason=f"no compiled layer operations here: {fastdecode.layer_ops_blocker()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bridged", [False, True], ids=["base", "bridge"])
def test_compiled_layers_run_and_equal_forward_call(dtype, bridged, monkeypatch):
    """Every layer runs on the compiled operations between products, the bridge's too, to the same bits."""
    model, tokenizer = make_tiny_llama(seed=0)
    model.to(dtype)
    fast, slow, _ = generators(model, tokenizer, bridged)
    assert fast.decode_step.layer_ops is not None
    compiled = []
    original = LlamaDecodeStep._compiled_layer

    def counted(self, *args):
        compiled.append(args[-2])  # the layer index
        return original(self, *args)

    monkeypatch.setattr(LlamaDecodeStep, "_compiled_layer", counted)
    requests = requests_for(tokenizer, sessions=bridged)
    assert_same_steps(step_logits(fast, requests[:2], join=requests[2]),
                      step_logits(slow, requests[:2], join=requests[2]))
    assert set(compiled) == set(range(model.config.num_hidden_layers))


@pytest.mark.skipif(fastdecode.layer_ops_blocker() is not None,
                    reason=f"no compiled layer operations here: {fastdecode.layer_ops_blocker()}")
def test_compiled_layers_follow_changes_mid_batch():
    """A hook on the final norm and a new activation, both added after the prefill, take effect at the next step."""
    model, tokenizer = make_tiny_llama(seed=0)
    fast, slow, _ = generators(model, tokenizer, bridged=False)
    requests = requests_for(tokenizer, sessions=False)[:2]
    logits = {}
    for name, generator in (("fast", fast), ("slow", slow)):
        batch = DecodeBatch(generator)
        batch.add(requests, [0, 1])
        batch.step()
        handle = model.model.norm.register_forward_hook(lambda module, args, out: out * 2)
        activation = model.model.layers[0].mlp.act_fn
        model.model.layers[0].mlp.act_fn = torch.nn.GELU()
        try:
            batch.step()
        finally:
            handle.remove()
            model.model.layers[0].mlp.act_fn = activation
        logits[name] = batch.logits
    assert torch.equal(logits["fast"], logits["slow"])


def test_step_without_compiled_layers(monkeypatch, caplog):
    """Where the compiled operations cannot serve, the step logs why and runs PyTorch's."""
    monkeypatch.setattr(fastdecode, "layer_ops_blocker", lambda: "kept off by the test")
    monkeypatch.setattr(LlamaDecodeStep, "_compiled_layer", None)  # a call would fail
    model, tokenizer = make_tiny_llama(seed=0)
    with caplog.at_level("INFO", logger="senab.fastdecode"):
        fast, slow, _ = generators(model, tokenizer, bridged=True)
    assert fast.decode_step.layer_ops is None
    assert "operations between products in PyTorch: kept off by the test" in caplog.text
    requests = requests_for(tokenizer, sessions=True)
    assert_same_steps(step_logits(fast, requests[:2]), step_logits(slow, requests[:2]))


def wide_tiny_llama() -> tuple[LlamaForCausalLM, object]:
    """Build a tiny Llama whose K/V width (64) is a whole block of the 4-bit layout, so q, k and v fuse."""
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize("copies", [False, True], ids=["int4 only", "dense copies"])
@pytest.mark.parametrize("bridged", [False, True], ids=["base", "bridge"])
def test_step_with_int4_weights(copies, bridged, monkeypatch):
    if copies and packed._self_check(torch.bfloat16) is not None:
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU")
    if quant.packed_block() is None:
        pytest.skip("this torch packs 4-bit codes in a layout that layers cannot be fused in")
    monkeypatch.setattr(quant, "amx_blocker", (lambda: None) if copies else (lambda: "switched off by the test"))
    model, tokenizer = wide_tiny_llama()
    snap_to_q4_1(model)
    report = quantize_model(model, "auto", torch.bfloat16)
    assert report.applied == "int4"
    assert report.dense_copies == copies
    model.to(torch.bfloat16)
    fast, slow, handle = generators(model, tokenizer, bridged)
    requests = requests_for(tokenizer, sessions=bridged)
    used: set[tuple[int, str]] = set()
    for key, (_, _, layer) in fast.decode_step._fusions.items():
        if layer is not None:
            # The step calls `kernel` or `forward` directly, so a hook would not see the calls.
            for name in ("kernel", "forward"):
                def counted(x, key=key, method=getattr(layer, name)):
                    used.add(key)
                    return method(x)

                setattr(layer, name, counted)
            assert (layer.dense is not None) == copies
    # Batches on both sides of INT4_MAX_ROWS, where layers with copies leave the 4-bit kernel.
    large = (requests * 3)[:quant.INT4_MAX_ROWS + 1]
    for batch, join in ((requests[:2], requests[2]), (large, None)):
        assert_same_steps(step_logits(fast, batch, join=join), step_logits(slow, batch, join=join))
    # Every layer fuses, the bridge's too: the step runs its read-in hook itself. Compiled
    # layers call the fused layers' kernels through their plans, which the counters do not see.
    step = fast.decode_step
    plans = [plan for rows_plans in step._plans.values() for plan in rows_plans]
    if step.layer_ops is None:
        assert used == {(i, kind) for i in range(6) for kind in ("qkv", "gate_up")}
    else:
        assert plans
        assert all(plan.qkv is not None and plan.gate_up is not None for plan in plans)
    assert all(step._fusions[(i, kind)][2] is not None for i in range(6) for kind in ("qkv", "gate_up"))


def int4_generators(copies: bool, monkeypatch) -> tuple[LlamaForCausalLM, Generator, Generator, list]:
    """Return the wide tiny Llama with 4-bit weights, a fast and a slow generator, and requests."""
    monkeypatch.setattr(quant, "amx_blocker", (lambda: None) if copies else (lambda: "switched off by the test"))
    model, tokenizer = wide_tiny_llama()
    snap_to_q4_1(model)
    quantize_model(model, "auto", torch.bfloat16)
    model.to(torch.bfloat16)
    fast, slow, _ = generators(model, tokenizer, bridged=False)
    return model, fast, slow, requests_for(tokenizer, sessions=False)


def test_step_follows_model_cast(monkeypatch):
    # The fused layers live outside the module tree, so they must follow `.to(dtype)` by themselves.
    model, fast, slow, requests = int4_generators(copies=False, monkeypatch=monkeypatch)
    model.to(torch.float32)
    large = (requests * 3)[:quant.INT4_MAX_ROWS + 1]
    for batch in (requests, large):
        assert_same_steps(step_logits(fast, batch), step_logits(slow, batch))
        assert step_logits(fast, batch)[0].dtype == torch.float32


def test_step_follows_loaded_weights(monkeypatch):
    model, fast, slow, requests = int4_generators(copies=False, monkeypatch=monkeypatch)
    before = step_logits(fast, requests)
    other, _ = wide_tiny_llama()
    torch.manual_seed(1)
    for parameter in other.parameters():
        parameter.data.normal_(0, 0.05)
    snap_to_q4_1(other)
    # Quantized as `model` was, so that both have the same modules (auto may pack the output layer).
    quantize_model(other, "auto", torch.bfloat16)
    model.load_state_dict(other.to(torch.bfloat16).state_dict())
    after = step_logits(fast, requests)
    assert not torch.equal(after[1], before[1])
    assert_same_steps(after, step_logits(slow, requests))


@pytest.mark.parametrize("where", ["model", "model.model", "model.model.layers.1.self_attn",
                                   "model.model.layers.1.self_attn.q_proj", "model.model.layers.1.self_attn.o_proj",
                                   "model.model.layers.2.mlp.up_proj", "model.model.layers.2.mlp.down_proj",
                                   "model.model.layers.2.post_attention_layernorm"])
def test_step_runs_hooks(where, monkeypatch):
    model, fast, slow, requests = int4_generators(copies=False, monkeypatch=monkeypatch)
    module = model.get_submodule(where.removeprefix("model").removeprefix("."))

    def scale(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * 1.5, *output[1:])
        for name in ("logits", "last_hidden_state"):  # the model's and the inner model's outputs
            if hasattr(output, name):
                setattr(output, name, getattr(output, name) * 1.5)
                return output
        return output * 1.5

    plain = step_logits(fast, requests)
    module.register_forward_hook(scale)
    hooked = step_logits(fast, requests)
    assert not torch.equal(hooked[1], plain[1])
    assert_same_steps(hooked, step_logits(slow, requests))


@pytest.mark.parametrize("with_kwargs", [False, True])
@pytest.mark.parametrize("changes", [False, True], ids=["observes", "changes input"])
def test_step_runs_layer_pre_hooks(with_kwargs, changes, monkeypatch):
    model, fast, slow, requests = int4_generators(copies=False, monkeypatch=monkeypatch)
    calls = []

    def hook(module, args, kwargs=None):
        calls.append(args[0].shape)
        if not changes:
            return None
        scaled = (args[0] * 1.5,)
        return (scaled, kwargs) if with_kwargs else scaled

    model.model.layers[2].register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    fast_logits = step_logits(fast, requests)
    assert len(calls) >= len(fast_logits)  # the prefill and every step
    assert_same_steps(fast_logits, step_logits(slow, requests))


def test_lone_row_differs_only_by_gqa_rounding(monkeypatch):
    """Transformers' own path for a batch without padding rounds differently, and only that."""
    monkeypatch.undo()  # the forward call as transformers runs it
    model, tokenizer = make_tiny_llama(seed=0)
    fast, slow, _ = generators(model, tokenizer, bridged=False)
    lone = requests_for(tokenizer, sessions=False)[1:2]
    fast_logits, slow_logits = step_logits(fast, lone), step_logits(slow, lone)
    assert len(fast_logits) == len(slow_logits) > 3
    for a, b in zip(fast_logits, slow_logits):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_step_follows_forced_gqa(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    model, tokenizer = make_tiny_llama(seed=0)
    fast = Generator(model, tokenizer, eos_token_ids=set())
    slow = Generator(model, tokenizer, eos_token_ids=set(), fast_decode=False)
    requests = requests_for(tokenizer, sessions=False)
    assert_same_steps(step_logits(fast, requests), step_logits(slow, requests))


def test_generators_share_one_step():
    model, tokenizer = make_tiny_llama(seed=0)
    first = Generator(model, tokenizer)
    second = Generator(model, tokenizer)
    assert first.decode_step is second.decode_step
    assert Generator(make_tiny_llama(seed=0)[0], tokenizer).decode_step is not first.decode_step


def test_other_models_keep_forward_call():
    model, _ = make_tiny_llama(seed=0)
    assert LlamaDecodeStep.for_model(model) is not None

    model.config._attn_implementation = "eager"
    assert LlamaDecodeStep.for_model(model) is None
    model.config._attn_implementation = "sdpa"

    class Patched(type(model.model.layers[0].mlp)):
        pass

    model.model.layers[0].mlp.__class__ = Patched
    assert LlamaDecodeStep.for_model(model) is None
    assert LlamaDecodeStep.for_model(torch.nn.Linear(2, 2)) is None


def test_step_takes_one_position():
    model, tokenizer = make_tiny_llama(seed=0)
    step = LlamaDecodeStep.for_model(model)
    with pytest.raises(ValueError, match="Invalid input_ids of 2 positions per row"):
        step(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
             torch.zeros(1, 2, dtype=torch.long), None)
