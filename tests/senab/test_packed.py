"""Dense float32 weights packed for the AVX2 product or oneDNN (senab.packed), and auto's choice of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import senab.packed as packed
from senab.bridge import attach_bridge, new_checkpoint
from senab.generation import DecodeBatch, GenerationRequest, Generator, SamplingParams
from senab.models import load_model
from senab.packed import PackedLinear, pack_model, packing_blocker
from senab.prompt import build_prompt
from senab.quant import quantize_model
from tests.helpers import make_tiny_llama, randomize_write_out

GREEDY = SamplingParams(max_tokens=16, temperature=0)
PROMPTS = ["Hello there", "Tell me a long story about the sea", "Hi"]

needs_panels = pytest.mark.skipif(packed.panel_blocker() is not None,
                                  reason=f"the AVX2 float32 product does not serve here: {packed.panel_blocker()}")
# The two float32 layouts of auto. It takes "mkldnn" where the AVX2 product does not serve.
LAYOUTS = [pytest.param("panels", marks=needs_panels), "mkldnn"]
TARGETS = {"panels": "the AVX2 float32 product", "mkldnn": "oneDNN"}


@pytest.fixture
def layout(request, monkeypatch):
    if request.param == "mkldnn":
        monkeypatch.setattr("senab.quant.panel_blocker", lambda: "kept off by the test")
    return request.param


def test_packed_linear_matches_linear():
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    layer = PackedLinear.from_linear(linear)
    for shape in [(1, 96), (7, 96), (2, 5, 96)]:
        x = torch.randn(*shape)
        out = layer(x)
        assert out.shape == (*shape[:-1], 80)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, linear(x), atol=1e-5, rtol=1e-5)


def test_packed_linear_takes_strided_and_bfloat16_inputs():
    torch.manual_seed(1)
    linear = nn.Linear(64, 48, bias=False)
    layer = PackedLinear.from_linear(linear)
    x = torch.randn(3, 4, 64)
    last = x[:, -1:, :]  # a view with gaps, as the output layer gets after a prefill
    assert not last.is_contiguous()
    torch.testing.assert_close(layer(last), linear(last), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x.to(torch.bfloat16)), linear(x.to(torch.bfloat16).float()), atol=1e-5,
                               rtol=1e-5)


def test_packed_rows_do_not_depend_on_the_batch():
    torch.manual_seed(2)
    layer = PackedLinear(torch.randn(576, 576) * 0.02, None)
    x = torch.randn(64, 576)
    with torch.inference_mode():
        batched = layer(x)
        for rows in (1, 2, 3, 8, 16, 64):
            assert torch.equal(layer(x[:rows]), batched[:rows]), rows
        for i in range(16):
            assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1]), i


def test_packed_linear_in_bfloat16():
    if packed._self_check(torch.bfloat16) is not None:
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU")
    torch.manual_seed(3)
    linear = nn.Linear(96, 80)
    layer = PackedLinear.from_linear(linear, torch.bfloat16)
    assert "dtype=bfloat16" in repr(layer)
    x = torch.randn(2, 7, 96)
    with torch.inference_mode():
        out = layer(x)  # float32 inputs are cast to the packed dtype
        assert out.dtype == torch.bfloat16
        assert out.shape == (2, 7, 80)
        torch.testing.assert_close(out.float(), linear(x), atol=0.05, rtol=0.02)
        flat = x.reshape(14, 96)
        batched = layer(flat)
        assert all(torch.equal(layer(flat[i:i + 1]), batched[i:i + 1]) for i in range(14))
        layer.to(torch.float32)  # the model's cast reaches the bias; the product still runs
        assert torch.equal(layer(x), out)


def test_packed_linear_rejects_other_dtypes():
    with pytest.raises(ValueError, match="Invalid dtype torch.float16 for packed weights: use torch.float32"):
        PackedLinear(torch.zeros(16, 16), None, torch.float16)


def test_pack_model_replaces_every_linear():
    model, _ = make_tiny_llama(seed=0)
    count = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_model(model) == count == 7 * model.config.num_hidden_layers + 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), PackedLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # the tied embeddings stay


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_auto_packs_float32_models(layout):
    model, tokenizer = make_tiny_llama(seed=0)
    reference, _ = make_tiny_llama(seed=0)
    report = quantize_model(model, "auto", torch.float32)
    assert report.applied == "packed"
    assert report.packed_layout == layout
    assert report.layers == 7 * model.config.num_hidden_layers + 1
    assert report.describe() == f"dense float32 weights packed for {TARGETS[layout]} in {report.layers} layers"
    assert all(m.layout == layout for m in model.modules() if isinstance(m, PackedLinear))

    ids = torch.tensor([build_prompt(tokenizer, [("user", "Hello there")]).ids])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_only_auto_packs(mode):
    model, _ = make_tiny_llama(seed=0)
    if mode == "int4":
        with pytest.raises(ValueError, match="set dtype to bfloat16"):
            quantize_model(model, mode, torch.float32)
    else:
        assert quantize_model(model, mode, torch.float32).applied == "none"
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.parametrize("device, dtype, expected", [
    ("meta", torch.float32, "the model runs on meta"),
    ("cpu", torch.bfloat16, "only float32 models are packed"),
])
def test_packing_blocker_says_why(device, dtype, expected):
    reason = packing_blocker(torch.device(device), dtype)
    assert reason is not None and expected in reason
    assert packing_blocker(torch.device("cpu"), torch.float32) is None


def test_failed_self_check_keeps_dense_weights(monkeypatch):
    monkeypatch.setattr("senab.quant.panel_blocker", lambda: "kept off by the test")
    monkeypatch.setattr(packed, "_self_check", lambda dtype: "oneDNN's packed linear does not match F.linear")
    model, _ = make_tiny_llama(seed=0)
    report = quantize_model(model, "auto", torch.float32)
    assert report.applied == "none"
    assert "does not match F.linear" in report.describe()
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_load_model_auto_packs_in_float32(tmp_path, layout):
    make_tiny_llama(tmp_path / "tiny", seed=4)
    loaded = load_model(str(tmp_path / "tiny"), dtype="float32", quantization="auto", home=tmp_path)
    plain = load_model(str(tmp_path / "tiny"), dtype="float32", quantization="none", home=tmp_path)
    assert loaded.quantization.startswith(f"dense float32 weights packed for {TARGETS[layout]}")
    assert plain.quantization == "dense weights (quantization none)"

    ids = [build_prompt(loaded.tokenizer, [("user", text)]).ids for text in PROMPTS]
    requests = [GenerationRequest(p, GREEDY) for p in ids]
    assert [r.token_ids for r in Generator(loaded.model, loaded.tokenizer).generate(requests)] == \
           [r.token_ids for r in Generator(plain.model, plain.tokenizer).generate(requests)]

    # transformers' own loop runs on packed layers too (bench/decode.py times it).
    prompt = torch.tensor([ids[0]])
    out = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=4,
                                min_new_tokens=4, pad_token_id=0)
    assert out.shape == (1, len(ids[0]) + 4)


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_bridged_packed_batch_invariance(layout):
    model, tokenizer = make_tiny_llama(seed=0)
    assert quantize_model(model, "auto", torch.float32).packed_layout == layout
    checkpoint = new_checkpoint(model.config)
    randomize_write_out(checkpoint.bridge)
    handle = attach_bridge(model, checkpoint.bridge)
    generator = Generator(model, tokenizer, handle)
    ids = [build_prompt(tokenizer, [("user", text)]).ids for text in PROMPTS]
    sessions = [np.random.default_rng(i).normal(size=32).astype(np.float32) for i in range(3)]
    requests = [GenerationRequest(p, GREEDY, session=s) for p, s in zip(ids, sessions)]
    alone = [generator.generate([r])[0].token_ids for r in requests]
    together = [row.token_ids for row in generator.generate(requests)]
    assert together == alone

    # A row that joins a running batch gets the logits it gets alone, to float rounding.
    batch = DecodeBatch(generator)
    batch.add(requests[:1], [0])
    batch.add(requests[1:], [1, 2])
    solo = DecodeBatch(generator)
    solo.add(requests[1:2], [1])
    torch.testing.assert_close(batch.logits[1], solo.logits[0], atol=1e-5, rtol=1e-5)


def test_in_memory_load_reads_only_the_model_files(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "tiny"
    make_tiny_llama(directory, seed=5)
    hidden = 64
    save_file({"model.norm.weight": torch.zeros(hidden)}, directory / "zz-adapter.safetensors")
    (directory / "generation_config.json").write_text("{not json")
    loaded = load_model(str(directory), dtype="float32", quantization="auto", home=tmp_path)
    plain = load_model(str(directory), dtype="float32", quantization="none", home=tmp_path)

    assert loaded.quantization.startswith("dense float32 weights packed")
    assert torch.equal(loaded.model.model.norm.weight, plain.model.model.norm.weight)
    assert loaded.model.model.norm.weight.abs().sum() > 0  # not the stray file's zeros


def test_batch_dependent_shape_keeps_dense_weights(monkeypatch):
    model, _ = make_tiny_llama(seed=0)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert packed.batch_dependent_shape(linears) is None  # this machine's oneDNN is row-invariant

    monkeypatch.setattr("senab.quant.panel_blocker", lambda: "kept off by the test")
    monkeypatch.setattr("senab.quant.batch_dependent_shape", lambda modules, **options: "128 x 64")
    report = quantize_model(model, "auto", torch.float32)
    assert report.applied == "none"
    assert "rounds 128 x 64 rows differently" in report.reason
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_weight_is_exact(dtype):
    if packed._self_check(dtype) is not None:
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    weight = torch.randn(96, 64) * 3
    layer = PackedLinear(weight, None, dtype)
    assert torch.equal(layer.unpacked_weight(), weight.to(dtype))


def panel_layer(out_features: int, in_features: int, *, bias: bool = True, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    offsets = torch.randn(out_features, generator=generator) if bias else None
    return PackedLinear(weight, offsets, torch.float32, "panels"), weight, offsets


@needs_panels
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 50, 301])
@pytest.mark.parametrize("shape", [(48, 64), (576, 576), (32, 1100)], ids=["small", "square", "long"])
def test_panels_match_float64(rows, shape):
    """Rows in one or several passes and tiles, inputs in one chunk or several (1,100 = 4 x 256 + 76)."""
    layer, weight, bias = panel_layer(*shape, seed=rows)
    inputs = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = layer(inputs)
    expected = inputs.double() @ weight.double().t() + bias.double()
    assert out.shape == (rows, shape[0])
    assert out.dtype == torch.float32
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


@needs_panels
@pytest.mark.parametrize("in_features", [64, 1100, 3000])
def test_panels_round_rows_alike(in_features):
    """A row's output is the same to the bit alone, in any pass of a batch and across tiles of rows."""
    layer, _, _ = panel_layer(64, in_features)
    inputs = torch.randn(70, in_features, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        batched = layer(inputs)
        for row in (0, 5, 6, 17, 41, 42, 69):
            assert torch.equal(layer(inputs[row:row + 1]), batched[row:row + 1])
        assert torch.equal(layer(inputs[30:47]), batched[30:47])
        # Leading dimensions pass through, as for nn.Linear.
        assert torch.equal(layer(inputs.view(7, 10, in_features)).view(70, -1), batched)


@needs_panels
def test_panels_edge_cases():
    layer, weight, _ = panel_layer(32, 40, bias=False)
    assert layer(torch.zeros(0, 40)).shape == (0, 32)
    assert torch.equal(layer.unpacked_weight(), weight)
    # Inputs of another dtype and strided inputs are cast and copied.
    inputs = torch.randn(40, 3).t()
    torch.testing.assert_close(layer(inputs.double()), inputs @ weight.t(), atol=1e-5, rtol=1e-5)
    assert "layout=panels" in repr(layer)


@needs_panels
def test_panels_reject_bad_input():
    layer, _, _ = panel_layer(32, 40)
    operator = torch.ops.senab_avx2.f32_mm
    with pytest.raises(RuntimeError, match="input must be a contiguous 2-D float32"):
        operator(torch.zeros(2, 40, dtype=torch.bfloat16), layer.packed, None)
    with pytest.raises(RuntimeError, match="input has 41 columns but the panels 40 inputs"):
        operator(torch.zeros(2, 41), layer.packed, None)
    with pytest.raises(RuntimeError, match="shape \\(N / 16, K, 16\\)"):
        operator(torch.zeros(2, 40), layer.packed.reshape(2, 80, 8), None)
    with pytest.raises(RuntimeError, match="32-byte boundary"):
        operator(torch.zeros(2, 39), torch.zeros(1 + 2 * 39 * 16)[1:].view(2, 39, 16), None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 vector of 32 values"):
        operator(torch.zeros(2, 40), layer.packed, torch.zeros(31))
    with pytest.raises(ValueError, match="multiple of 16; use layout mkldnn"):
        PackedLinear(torch.zeros(20, 40), None, torch.float32, "panels")
    with pytest.raises(ValueError, match="multiple of 16; use layout mkldnn"):
        PackedLinear(torch.zeros(32, 40), None, torch.bfloat16, "panels")
    with pytest.raises(ValueError, match="Invalid layout 'tiles'"):
        PackedLinear(torch.zeros(32, 40), None, torch.float32, "tiles")


@needs_panels
def test_pack_model_odd_layers_onednn():
    model = nn.Sequential(nn.Linear(40, 32), nn.Linear(32, 20))
    expected = model(torch.ones(3, 40))
    assert pack_model(model, "panels") == 2
    assert [layer.layout for layer in model] == ["panels", "mkldnn"]
    with torch.inference_mode():
        torch.testing.assert_close(model(torch.ones(3, 40)), expected, atol=1e-5, rtol=1e-5)


def test_panel_blocker_reasons(monkeypatch):
    monkeypatch.setattr(packed, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    packed.panel_blocker.cache_clear()
    try:
        assert packed.panel_blocker() == "the CPU lacks fma"
        monkeypatch.setattr(packed, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
        monkeypatch.setenv("SENAB_NATIVE_KERNELS", "0")
        packed.panel_blocker.cache_clear()
        assert "SENAB_NATIVE_KERNELS turns compiled operators off" in packed.panel_blocker()
    finally:
        packed.panel_blocker.cache_clear()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_rejects_width_and_gradients(layout):
    layer = PackedLinear(torch.randn(32, 40), torch.zeros(32), torch.float32, layout)
    with pytest.raises(ValueError, match=r"shape \(4, 20\) for a packed layer of 40 inputs"):
        layer(torch.randn(4, 20))
    with pytest.raises(ValueError, match="last dimension must be the layer's input size"):
        layer(torch.randn(0, 20))
    inputs = torch.randn(3, 40, requires_grad=True)
    with pytest.raises(RuntimeError, match="compute no gradient: train on the plain weights"):
        layer(inputs)
    with torch.no_grad():
        assert layer(inputs).shape == (3, 32)


def test_panels_rejected_without_product(monkeypatch):
    monkeypatch.setattr(packed, "panel_blocker", lambda: "the CPU lacks fma")
    packed._panel_product.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"cannot serve here \(the CPU lacks fma\); pack with layout mkldnn"):
            PackedLinear(torch.randn(32, 40), None, torch.float32, "panels")
    finally:
        packed._panel_product.cache_clear()


@needs_panels
def test_auto_checks_odd_onednn_layers(monkeypatch):
    # Whether oneDNN rounds a 100 x 32 layer's rows alike depends on the CPU, so the test sets both outcomes.
    monkeypatch.setattr("senab.quant.batch_dependent_shape", lambda modules, **options: None)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 100))
    report = quantize_model(model, "auto", torch.float32)
    assert report.describe() == "dense float32 weights packed for the AVX2 float32 product in 1 layers and for oneDNN in 1"
    assert [layer.layout for layer in model] == ["panels", "mkldnn"]

    # Where oneDNN would round the 100-output layer's rows by batch, nothing is packed.
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 100))
    monkeypatch.setattr("senab.quant.batch_dependent_shape", lambda modules, **options: "100 x 32")
    report = quantize_model(model, "auto", torch.float32)
    assert report.applied == "none"
    assert "multiples of 16 cannot go to oneDNN: oneDNN's packed linear rounds 100 x 32 rows" in report.panels_reason
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
