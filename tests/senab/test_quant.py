"""4-bit weights (senab.quant) and the model loader's quantization option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from senab.bridge import attach_bridge, new_checkpoint
from senab.generation import DecodeBatch, GenerationRequest, Generator, SamplingParams
from senab.models import ModelError, load_model
from senab.prompt import build_prompt
import senab.packed as packed
import senab.quant as quant
from senab.quant import (
    EXACT_TOLERANCE, GROUP_SIZE, INT4_MAX_ROWS, Int4Linear, PackedOutputLayer, QuantizationError, groupwise_grid,
    int4_blocker,
    quantize_model,
)
from tests.helpers import make_tiny_llama, randomize_write_out, save_tiny_gguf

GREEDY = SamplingParams(max_tokens=16, temperature=0)
# bfloat16 weights pack for oneDNN only where the CPU has AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT.
needs_bf16_packing = pytest.mark.skipif(packed._self_check(torch.bfloat16) is not None,
                                        reason="oneDNN cannot pack bfloat16 weights on this CPU")


@pytest.fixture(params=["int4 only", "dense copies"])
def dense_copies(request, monkeypatch) -> bool:
    """Run a test with and without the packed bfloat16 copies, whatever this CPU's AMX."""
    if request.param == "int4 only":
        monkeypatch.setattr(quant, "amx_blocker", lambda: "switched off by the test")
        return False
    if packed._self_check(torch.bfloat16) is not None:
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU")
    monkeypatch.setattr(quant, "amx_blocker", lambda: None)
    return True


def q4_1_weight(rows: int, columns: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a float32 weight dequantized from Q4_1 blocks (float16 d and m) and its codes."""
    rng = np.random.default_rng(seed)
    groups = columns // GROUP_SIZE
    codes = rng.integers(0, 16, size=(rows, groups, GROUP_SIZE))
    codes[..., 0], codes[..., 1] = 0, 15  # a Q4_1 quantizer maps each group's min and max there
    d = rng.uniform(0.001, 0.02, size=(rows, groups, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.15, 0.0, size=(rows, groups, 1)).astype(np.float16).astype(np.float32)
    weight = (codes * d + m).astype(np.float32).reshape(rows, columns)
    return torch.from_numpy(weight), torch.from_numpy(codes.reshape(rows, columns))


def quantized_tiny_llama(mode: str) -> tuple[nn.Module, quant.QuantizationReport]:
    """Build the tiny Llama with its weights on a Q4_1 grid, quantize it in `mode`, and return both."""
    model, _ = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    return model, quantize_model(model, mode, torch.bfloat16)


def snap_to_q4_1(model: nn.Module) -> None:
    """Round every eligible linear weight of `model` to a Q4_1 grid, in place."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            grid = groupwise_grid(module.weight)
            rows, columns = module.weight.shape
            codes = grid.codes.reshape(rows, -1, GROUP_SIZE).float()
            snapped = codes * grid.scales.half().float()[..., None] + grid.minimums.half().float()[..., None]
            module.weight.data.copy_(snapped.reshape(rows, columns))


def test_grid_recovers_q4_1_codes_exactly():
    weight, codes = q4_1_weight(48, 96)
    grid = groupwise_grid(weight)
    assert grid.exact and grid.relative_error < 1e-6
    assert torch.equal(grid.codes, codes.to(torch.int32))


def test_grid_of_dense_weights_is_not_exact():
    grid = groupwise_grid(torch.randn(48, 96))
    assert not grid.exact
    assert grid.relative_error > 100 * EXACT_TOLERANCE


def test_int4_linear_multiplies_by_the_grid_weight():
    weight, _ = q4_1_weight(64, 96, seed=1)
    linear = nn.Linear(96, 64)
    linear.weight.data.copy_(weight)
    layer = Int4Linear.from_linear(linear).to(torch.bfloat16)
    torch.testing.assert_close(layer.dequantized_weight(), weight, atol=2e-3, rtol=0)
    x = torch.randn(2, 5, 96)
    expected = linear(x)
    out = layer(x.to(torch.bfloat16))
    assert out.shape == (2, 5, 64)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_int4_linear_rows_independent():
    weight, _ = q4_1_weight(64, 96, seed=2)
    linear = nn.Linear(96, 64, bias=False)
    linear.weight.data.copy_(weight)
    layer = Int4Linear.from_linear(linear).to(torch.bfloat16)
    x = torch.randn(16, 96, dtype=torch.bfloat16)
    together = layer(x)
    for i in range(16):
        assert torch.equal(layer(x[i:i + 1])[0], together[i])


def test_auto_quantizes_a_model_on_a_q4_grid():
    model, _ = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = quantize_model(model, "auto", torch.bfloat16)
    assert report.applied == "int4"
    assert report.exact
    assert report.layers == 7 * model.config.num_hidden_layers
    assert "exact" in report.describe()
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            torch.testing.assert_close(module.dequantized_weight(), dense[name], atol=1e-6, rtol=0)
    # The output layer keeps its values: plain, or packed in bfloat16 where the CPU multiplies
    # bfloat16 natively.
    assert report.packed_output == (report.dense_copies or quant.output_packing_blocker() is None)
    assert isinstance(model.get_output_embeddings(), PackedOutputLayer if report.packed_output else nn.Linear)


def test_auto_keeps_dense_weights_and_says_why():
    model, _ = make_tiny_llama(seed=0)
    report = quantize_model(model, "auto", torch.bfloat16)
    assert report.applied == "none"
    assert "not on a 4-bit grid" in report.reason
    assert "model.layers.0" in report.reason
    assert not any(isinstance(m, Int4Linear) for m in model.modules())  # nothing half-replaced

    snap_to_q4_1(model)
    report = quantize_model(model, "auto", torch.float16)
    assert report.applied == "none"
    assert "float16" in report.reason
    assert "only float32 models are packed" in report.reason  # auto's second choice, and why not


def test_int4_mode_quantizes_dense_weights_lossily():
    model, _ = make_tiny_llama(seed=0)
    report = quantize_model(model, "int4", torch.bfloat16)
    assert report.applied == "int4"
    assert not report.exact
    assert "lossy" in report.describe()


@pytest.mark.parametrize("dtype, device, expected", [
    (torch.float32, "cpu", "set dtype to bfloat16"),
    (torch.bfloat16, "meta", "4-bit kernel is for CPUs"),
])
def test_int4_blocker_names_the_fix(dtype, device, expected):
    with pytest.raises(QuantizationError, match=expected):
        int4_blocker("int4", torch.device(device), dtype)
    assert int4_blocker("auto", torch.device(device), dtype) is not None
    with pytest.raises(QuantizationError, match="Invalid quantization 'q8'"):
        int4_blocker("q8", torch.device("cpu"), torch.bfloat16)


def test_layers_the_kernel_cannot_run_stay_dense():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40), nn.Linear(40, 64))
    report = quantize_model(model, "int4", torch.bfloat16)
    assert report.layers == 1 and isinstance(model[0], Int4Linear)
    assert report.skipped == {"1": "output size 40 is not a multiple of 16",
                              "2": "input size 40 is not a multiple of 32"}
    with pytest.raises(QuantizationError, match="no linear layer fits the 4-bit kernel"):
        quantize_model(nn.Sequential(nn.Linear(40, 64)), "int4", torch.bfloat16)


def test_bridged_int4_batch_invariance(dense_copies):
    model, tokenizer = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    report = quantize_model(model, "auto", torch.bfloat16)
    assert report.applied == "int4"
    assert report.dense_copies == dense_copies
    model.to(torch.bfloat16)
    checkpoint = new_checkpoint(model.config)
    randomize_write_out(checkpoint.bridge)
    base = Generator(model, tokenizer)
    prompts = ["Hello there", "Tell me a long story about the sea", "Hi"]
    ids = [build_prompt(tokenizer, [("user", text)]).ids for text in prompts]
    bare = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                           output_logits=True, return_dict_in_generate=True) for p in ids]

    handle = attach_bridge(model, checkpoint.bridge)
    generator = Generator(model, tokenizer, handle)
    sessions = [np.random.default_rng(i).normal(size=32).astype(np.float32) for i in range(3)]
    requests = [GenerationRequest(p, GREEDY, session=s) for p, s in zip(ids, sessions)]
    if dense_copies:
        # The copies round a prompt's long rows and a large batch's rows their own way, and
        # bfloat16 attention rounds with the padding, so only rounding may differ.
        alone = [greedy_logits(generator, [r])[0] for r in requests]
        for row, reference in zip(greedy_logits(generator, requests), alone):
            assert_same_but_rounding(row, reference)
    else:
        alone = [generator.generate([r])[0].token_ids for r in requests]
        together = [row.token_ids for row in generator.generate(requests)]
        assert together == alone

    # With the bridge switched off per row, each row is the base model's own greedy output.
    off_requests = [GenerationRequest(p, GREEDY) for p in ids]
    off = generator.generate(off_requests)
    eos = tokenizer.eos_token_id
    if dense_copies:
        for row, reference in zip(greedy_logits(generator, off_requests), bare):
            assert_same_but_rounding(row, [step[0].float() for step in reference.logits][:len(row)])
    else:
        for row, reference, p in zip(off, bare, ids):
            tokens = reference.sequences[0, len(p):].tolist()
            assert row.token_ids == [t for t in tokens if t != eos][:len(row.token_ids)]
    assert [r.token_ids for r in base.generate([GenerationRequest(p, GREEDY) for p in ids])] == \
           [r.token_ids for r in off]


def int4_layer(rows: int = 128, columns: int = 96, seed: int = 5) -> tuple[Int4Linear, nn.Linear]:
    weight, _ = q4_1_weight(rows, columns, seed=seed)
    linear = nn.Linear(columns, rows)
    linear.weight.data.copy_(weight)
    return Int4Linear.from_linear(linear).to(torch.bfloat16), linear


@needs_bf16_packing
def test_dense_copy_serves_large_calls():
    layer, linear = int4_layer()
    kernel_only = Int4Linear.from_linear(linear).to(torch.bfloat16)
    layer.keep_dense_copy(linear.weight)
    assert "dense copy in bfloat16" in repr(layer)
    torch.manual_seed(0)
    with torch.inference_mode():
        few = torch.randn(INT4_MAX_ROWS, 1, 96, dtype=torch.bfloat16)  # one decode step
        assert torch.equal(layer(few), kernel_only(few))
        many = torch.randn(INT4_MAX_ROWS + 1, 1, 96, dtype=torch.bfloat16)
        prompt = torch.randn(1, 5, 96, dtype=torch.bfloat16)
        for x in (many, prompt):
            out = layer(x)
            assert out.dtype == torch.bfloat16
            assert out.shape == (*x.shape[:-1], 128)
            assert torch.equal(out, layer.dense(x))
            assert not torch.equal(out, kernel_only(x))  # the copy really serves, in its own rounding
            torch.testing.assert_close(out.float(), linear(x.float()), atol=0.05, rtol=0.02)
        # A prompt's rows come out the same whatever is prefilled with it.
        batch = torch.cat([prompt, torch.randn(3, 5, 96, dtype=torch.bfloat16)])
        assert torch.equal(layer(batch)[:1], layer(prompt))


def test_dense_copy_keeps_the_model_dtype(dense_copies):
    model, tokenizer = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    quantize_model(model, "auto", torch.bfloat16)
    model.to(torch.float32)  # a float32 model runs both paths in float32
    layer = next(m for m in model.modules() if isinstance(m, Int4Linear))
    with torch.inference_mode():
        for rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1):
            assert layer(torch.randn(rows, layer.in_features)).dtype == torch.float32, rows
        ids = build_prompt(tokenizer, [("user", "Hello there")]).ids
        rows = INT4_MAX_ROWS + 1
        logits = model(torch.tensor([ids] * rows)).logits
    assert logits.dtype == torch.float32
    assert logits.shape[0] == rows


def test_auto_dense_copies_where_they_pay(dense_copies):
    model, _ = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    output_weight = model.get_output_embeddings().weight.detach().clone()
    report = quantize_model(model, "auto", torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert report.applied == "int4"
    assert len(layers) == report.layers
    assert all((m.dense is not None) == dense_copies for m in layers)
    assert ("bfloat16 copies packed" in report.describe()) == dense_copies
    # The output layer is packed with the copies, and without them where the CPU multiplies
    # bfloat16 natively; its logits keep the model's dtype.
    output = model.get_output_embeddings()
    assert report.packed_output == (dense_copies or quant.output_packing_blocker() is None)
    assert isinstance(output, PackedOutputLayer) == report.packed_output
    if report.packed_output:
        assert "output layer packed in bfloat16" in report.describe()
        model.to(torch.bfloat16)
        hidden = torch.randn(3, output.in_features, dtype=torch.bfloat16)
        with torch.inference_mode():
            logits = output(hidden)
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), hidden.float() @ output_weight.t(), atol=0.05, rtol=0.02)
    assert (report.dense_copies_reason == "switched off by the test") != dense_copies


def test_int4_mode_keeps_no_dense_copies(monkeypatch):
    monkeypatch.setattr(quant, "amx_blocker", lambda: None)
    model, report = quantized_tiny_llama("int4")
    assert report.applied == "int4"
    assert not report.dense_copies
    assert all(m.dense is None for m in model.modules() if isinstance(m, Int4Linear))


def test_no_amx_no_dense_copies(monkeypatch):
    monkeypatch.setattr(packed, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    model, report = quantized_tiny_llama("auto")
    assert report.applied == "int4"
    assert not report.dense_copies
    assert "no AMX tiles" in report.dense_copies_reason
    # AVX-512 BF16 multiplies bfloat16 natively: the output layer is packed all the same.
    assert report.packed_output == (packed._self_check(torch.bfloat16) is None)
    assert isinstance(model.get_output_embeddings(), PackedOutputLayer) == report.packed_output


def test_output_layer_stays_plain_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(packed, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert "natively" in packed.output_packing_blocker()
    model, report = quantized_tiny_llama("auto")
    assert report.applied == "int4"
    assert not report.packed_output
    assert type(model.get_output_embeddings()) is nn.Linear
    assert "output layer" not in report.describe()


@needs_bf16_packing
def test_packed_output_layer_gives_the_plain_layers_logits():
    model, _ = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    plain = copy.deepcopy(model.get_output_embeddings()).to(torch.bfloat16)
    quantize_model(model, "auto", torch.bfloat16)
    model.to(torch.bfloat16)
    output = model.get_output_embeddings()
    assert isinstance(output, PackedOutputLayer)
    hidden = torch.randn(16, plain.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        # Same inputs, same weights rounded to bfloat16 once: the rounding of oneDNN's sums
        # may differ from the plain product's only in the last bit.
        torch.testing.assert_close(output(hidden), plain(hidden), atol=1e-3, rtol=2 ** -7)
        for rows in (1, 5, 16):
            assert torch.equal(output(hidden[:rows]), output(hidden)[:rows])


def test_row_dependent_copies_are_dropped(monkeypatch):
    monkeypatch.setattr(quant, "amx_blocker", lambda: None)
    monkeypatch.setattr(quant, "batch_dependent_shape", lambda modules, **options: "64 x 64")
    model, report = quantized_tiny_llama("auto")
    assert report.applied == "int4"
    assert not report.dense_copies
    assert "rounds 64 x 64 rows differently" in report.dense_copies_reason


ROUNDING = 0.02  # logits of the tiny bfloat16 model that differ by less differ by rounding


def greedy_logits(generator: Generator, requests: list[GenerationRequest]) -> list[list[torch.Tensor]]:
    """Decode `requests` as one batch; return each row's logits (V,) at every step."""
    batch = DecodeBatch(generator)
    batch.add(requests, list(range(len(requests))))
    logits: list[list[torch.Tensor]] = [[] for _ in requests]
    while batch.rows:
        for row, row_logits in zip(batch.rows, batch.logits):
            logits[row.index].append(row_logits.float())
        batch.step()
    return logits


def assert_same_but_rounding(row: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Check that `row` follows `reference` until their best tokens nearly tie, within rounding."""
    for step, (got, expected) in enumerate(zip(row, reference)):
        assert (got - expected).abs().max() <= ROUNDING, step
        if got.argmax() != expected.argmax():
            best = expected.topk(2).values
            assert best[0] - best[1] <= 2 * ROUNDING, f"step {step} picked another token by more than rounding"
            return
    assert len(row) == len(reference)


@pytest.fixture(scope="module")
def q4_1_gguf(tmp_path_factory):
    model, tokenizer = make_tiny_llama(seed=3)
    return save_tiny_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4.gguf", model, tokenizer, q4_1=True)


def test_load_q4_1_gguf_as_int4(q4_1_gguf, tmp_path):
    loaded = load_model(str(q4_1_gguf), dtype="bfloat16", home=tmp_path)
    assert loaded.quantization == "dense weights (quantization none)"  # load_model's default
    assert not loaded.int4

    loaded = load_model(str(q4_1_gguf), dtype="bfloat16", quantization="auto", home=tmp_path)
    assert loaded.int4
    assert loaded.quantization.startswith("int4 weights")
    assert "(exact)" in loaded.quantization
    reference = load_model(str(q4_1_gguf), dtype="float32", home=tmp_path).model
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits.float()
        expected = reference(input_ids=ids).logits
    # bfloat16 activations against the float32 model: a few hundredths on logits near 1.
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)

    float32 = load_model(str(q4_1_gguf), dtype="float32", quantization="auto", home=tmp_path)
    assert not float32.int4  # in float32, auto packs the dense weights instead
    assert float32.quantization.startswith("dense float32 weights packed for")


def test_load_model_rejects_int4_in_float32_before_loading(tmp_path):
    with pytest.raises(ModelError, match="set dtype to bfloat16"):
        load_model(str(tmp_path / "does-not-exist"), dtype="float32", quantization="int4", home=tmp_path)
    with pytest.raises(ModelError, match="Invalid quantization 'fp4'"):
        load_model(None, quantization="fp4", home=tmp_path, pull=False)


def test_long_inputs_use_the_unpacked_weight():
    from senab.quant import UNPACK_POSITIONS, packed_block

    weight, _ = q4_1_weight(128, 96, seed=4)
    linear = nn.Linear(96, 128)
    linear.weight.data.copy_(weight)
    layer = Int4Linear.from_linear(linear).to(torch.bfloat16)
    block = packed_block()
    assert block is not None  # a torch whose packing we cannot read would make this test moot
    torch.testing.assert_close(layer.unpack(block).float(), layer.dequantized_weight(), atol=2e-3, rtol=0)

    x = torch.randn(1, UNPACK_POSITIONS + 3, 96, dtype=torch.bfloat16)
    kernel = layer(x.reshape(-1, 96)).reshape(1, -1, 128)  # one position per row: the kernel
    unpacked = layer(x)
    assert not torch.equal(unpacked, kernel)  # the two methods really differ in rounding
    torch.testing.assert_close(unpacked.float(), kernel.float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(unpacked.float(), linear(x.float()), atol=0.05, rtol=0.02)


def test_long_and_short_prompts_prefill_apart(monkeypatch):
    import senab.generation as generation
    import senab.quant as quant

    model, tokenizer = make_tiny_llama(seed=0)
    snap_to_q4_1(model)
    quantize_model(model, "auto", torch.bfloat16)
    model.to(torch.bfloat16)
    monkeypatch.setattr(quant, "UNPACK_POSITIONS", 24)
    monkeypatch.setattr(generation, "LONG_PROMPT", 24)
    short = build_prompt(tokenizer, [("user", "Hi")]).ids
    long = build_prompt(tokenizer, [("user", "Tell me a long story about the sea, the wind and a boat " * 2)]).ids
    assert len(short) < 24 <= len(long)

    generator = Generator(model, tokenizer)
    widths = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: widths.append(args[0].shape[:2]))
    alone = [generator.generate([GenerationRequest(ids, GREEDY)])[0].token_ids for ids in (short, long)]
    widths.clear()
    together = generator.generate([GenerationRequest(short, GREEDY), GenerationRequest(long, GREEDY)])
    hook.remove()
    assert [row.token_ids for row in together] == alone
    assert widths[:2] == [(1, len(short)), (1, len(long))]  # two prefills, one per length class


def test_concatenate_matches_separate_layers():
    block = quant.packed_block()
    if block is None:
        pytest.skip("this torch packs 4-bit codes in a layout that layers cannot be fused in")
    layers, weights = [], []
    for seed, rows in enumerate((2 * block, block, block)):
        weight, _ = q4_1_weight(rows, 96, seed=seed)
        linear = nn.Linear(96, rows)
        linear.weight.data.copy_(weight)
        layers.append(Int4Linear.from_linear(linear).to(torch.bfloat16))
        weights.append(linear)
    fused = Int4Linear.concatenate(layers)
    assert fused.out_features == 4 * block
    assert fused.dense is None
    # Block by block, the packed codes are those of the concatenated weights.
    together = nn.Linear(96, 4 * block)
    together.weight.data.copy_(torch.cat([w.weight for w in weights]))
    assert torch.equal(fused.packed, Int4Linear.from_linear(together).packed)
    with torch.inference_mode():
        for rows in (1, INT4_MAX_ROWS):
            x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)
            assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], -1))

    odd, _ = int4_layer(rows=block + 16)
    assert Int4Linear.concatenate([layers[0], odd]) is None
    assert Int4Linear.concatenate([layers[0], layers[1].to(torch.float32)]) is None


@needs_bf16_packing
def test_row_dependent_output_layer_stays_dense(monkeypatch):
    monkeypatch.setattr(quant, "amx_blocker", lambda: None)
    monkeypatch.setattr(quant, "rounds_rows_alike", lambda layer, rows=16: False)
    model, report = quantized_tiny_llama("auto")
    assert report.dense_copies
    assert not report.packed_output
    assert type(model.get_output_embeddings()) is nn.Linear
    assert "output layer" not in report.describe()
