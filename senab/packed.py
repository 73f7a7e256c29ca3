"""Dense float32 weights in a layout for a faster CPU product, for decoding on a CPU.

`F.linear` on a CPU calls MKL's sgemm on the plain (out, in) weight. For the few rows of
a decode step it is slow, and it grows fast with the rows. On a 2-core AMD EPYC with
AVX2 (torch 2.13), the 210 decoder layers of SmolLM2-135M took 44 ms for 1 row and
154 ms for 16, and the 49K x 576 output layer 13 and 57 ms. MKL also rounded a row
differently alone than in a call with other rows. Two layouts do better:

- "panels", for the compiled product of `senab/csrc/f32_avx2.cpp` (AVX2 with FMA): the
  weight in panels of `PANEL` outputs, each read front to back. It reads each weight once
  per call for all rows and keeps 6 rows by 16 outputs in registers. On a 2-core AVX2 EPYC
  (another machine than above, same family) the 210 layers took 18 to 22 ms for 1 row
  against 30 to 35 for oneDNN, and 36 to 38 ms for 16 rows against 55 to 61. Over 672
  prompt positions, 14 of the layers took 57 to 63 ms against 60 to 65. The output layer took
  4 to 5 ms against 5.5 to 6 for 1 row, and 8 to 9 against 12 for 16 (several runs, in one
  process each). One row reads the weights at 21 of the 23 GB/s the two cores read; oneDNN
  at 14.
  Every output is one chain of fused multiply-adds over the inputs in order, whatever
  the rows in the call, so a row's result does not depend on its batch.
- "mkldnn": oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, then
  `torch.ops.mkldnn._linear_pointwise`, the ops Inductor's CPU freezing uses). On the first
  machine above it took 41 and 87 ms for the 210 layers at 1 and 16 rows, and the output
  layer 6 and 18 ms. It rounds each row the same way, to the bit, whatever the number of
  rows in the call.

`quantize_model` packs float32 models in panels where `panel_blocker` returns None, and in
oneDNN's layout otherwise. For oneDNN, `packing_blocker` checks both properties once per
process on a small layer, and `batch_dependent_shape` checks row invariance on one layer of
each of the model's shapes (oneDNN picks kernels by shape and CPU); `quantize_model` keeps
the plain weights if either fails. NOTE: these checks and `panel_blocker` run on the loading
thread's single intra-op thread, but the server decodes on all cores. On AVX2 the rows were bit-identical
with 1 and 2 threads.

Packed layers have no gradient, so only serving packs them. Training, evaluation and
`senab compare` keep the plain weights.

oneDNN packs bfloat16 weights too. On a CPU with AMX tiles a bfloat16 product costs about
the same for 1 row as for 16, unlike the 4-bit kernel of `senab.quant`. So on such a CPU
the 4-bit layers keep a packed bfloat16 copy for batches and prompts (see `Int4Linear`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from senab import native

PACKED_DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("mkldnn", "panels")
PANEL = 16  # outputs per panel of `senab/csrc/f32_avx2.cpp`
PANEL_SOURCE = "f32_avx2.cpp"
PANEL_FLAGS = (*native.COMMON_FLAGS, "-fopenmp", "-mavx2", "-mfma")
PANEL_CPU_FLAGS = ("avx2", "fma")


class PackedLinear(nn.Module):
    """A frozen linear layer whose weight is stored in a layout for a faster CPU product.

    `layout` "mkldnn" is oneDNN's blocked layout, in float32 or bfloat16. "panels" (float32
    only, output size a multiple of `PANEL`) is the layout of the compiled AVX2 product,
    where `panel_blocker` returns None. The packed weight is a plain attribute, not a
    buffer, because a tensor in the mkldnn layout cannot be cast, saved or moved like a
    dense one. It keeps the dtype it was packed in and stays on the CPU; inputs are cast to
    that dtype. So a packed model is for inference only. `state_dict()` leaves the packed
    weights out, and deepcopy and pickling raise for oneDNN's layout. `.to(dtype)` leaves
    these layers' weights in their dtype but rounds the bias. An input that requires a
    gradient raises RuntimeError.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                 layout: str = "mkldnn") -> None:
        super().__init__()
        if dtype not in PACKED_DTYPES:
            raise ValueError(f"Invalid dtype {dtype} for packed weights: use torch.float32 or torch.bfloat16")
        if layout not in LAYOUTS:
            raise ValueError(f"Invalid layout {layout!r} for packed weights: use one of {', '.join(LAYOUTS)}")
        self.out_features, self.in_features = weight.shape
        if layout == "panels":
            if dtype != torch.float32 or self.out_features % PANEL or not self.in_features:
                raise ValueError(f"Invalid panels layout for a {self.out_features} x {self.in_features} weight in "
                                 f"{dtype}: it takes float32 weights with inputs and an output size that is a "
                                 f"multiple of {PANEL}; use layout mkldnn")
            _panel_product()  # Raises here rather than at the first call where the product cannot serve.
        self.dtype = dtype
        self.layout = layout
        weight = weight.detach().to(dtype)
        if layout == "panels":
            self.packed = weight.reshape(-1, PANEL, self.in_features).transpose(1, 2).contiguous()
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear, dtype: torch.dtype = torch.float32, layout: str = "mkldnn") -> PackedLinear:
        return cls(module.weight, module.bias, dtype, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"Invalid input of shape {tuple(x.shape)} for a packed layer of {self.in_features} "
                             "inputs: its last dimension must be the layer's input size")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("Packed layers compute no gradient: train on the plain weights "
                               "(quantization none), or run under torch.no_grad() or torch.inference_mode()")
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != self.dtype:
            flat = flat.to(self.dtype)
        # `.to(dtype)` on the model casts the bias with the rest; the product takes one dtype.
        bias = self.bias if self.bias is None or self.bias.dtype == self.dtype else self.bias.to(self.dtype)
        if self.layout == "panels":
            out = _panel_product()(flat.contiguous(), self.packed, bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def unpacked_weight(self) -> torch.Tensor:
        """Return the (out, in) weight in the packed dtype, exactly.

        Panels are reshaped. oneDNN's layout is read through a product with the identity, each
        of whose outputs is one weight times 1 plus zeros.
        """
        if self.layout == "panels":
            return self.packed.transpose(1, 2).reshape(self.out_features, self.in_features).clone()
        identity = torch.eye(self.in_features, dtype=self.dtype)
        with torch.inference_mode():
            product = torch.ops.mkldnn._linear_pointwise(identity, self.packed, None, "none", [], "")
        return product.t().contiguous()

    def extra_repr(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"dtype={dtype}")


def cpu_flags() -> frozenset[str]:
    """Return the feature flags of /proc/cpuinfo (empty where there is none, as off Linux)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def packing_blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Return why float32 weights cannot be packed to serve on `device` in `dtype`, or None when they can."""
    if device.type != "cpu":
        return f"the model runs on {device}"
    if dtype != torch.float32:
        # bfloat16 weights are packed only as the copy that 4-bit layers keep (`amx_blocker`).
        return f"the model runs in {str(dtype).removeprefix('torch.')}, and only float32 models are packed"
    return _onednn_blocker() or _self_check(torch.float32)


def amx_blocker() -> str | None:
    """Return why packed bfloat16 products would not pay on this CPU, or None when they do.

    They were measured only where the CPU has AMX tiles (`amx_bf16`), so elsewhere the
    4-bit kernel serves alone.
    """
    if "amx_bf16" not in cpu_flags():
        return "the CPU has no AMX tiles for bfloat16 (amx_bf16)"
    return _onednn_blocker() or _self_check(torch.bfloat16)


def output_packing_blocker() -> str | None:
    """Return why the output layer of a 4-bit model should not run packed in bfloat16 here, or None.

    It pays on CPUs that multiply bfloat16 natively, because a plain bfloat16 weight is
    reordered for oneDNN at every call. On a 2-core AMD EPYC with AVX-512 BF16 (Zen 4, torch
    2.13), SmolLM2-135M's 49K x 576 output layer took 1.1 to 1.5 ms packed against 4.0 to
    4.7 ms plain for one row. For 16 rows it took 3.0 against 6.5 to 7.3 ms, with the same
    logits to the bit.
    """
    if not {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
        return "the CPU multiplies bfloat16 natively neither with AVX-512 BF16 nor with AMX"
    return _onednn_blocker() or _self_check(torch.bfloat16)


def _onednn_blocker() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return f"this PyTorch {torch.__version__} was built without oneDNN"
    return None


# The packed product in bfloat16 rounds its output to bfloat16 (8 significant bits).
_MATCH_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@functools.cache
def _self_check(dtype: torch.dtype) -> str | None:
    """Check once per process and dtype that the packed product matches `F.linear` and is row-invariant."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    inputs = torch.randn(16, 64, generator=generator).to(dtype)
    name = str(dtype).removeprefix("torch.")
    try:
        layer = PackedLinear(weight, None, dtype)
        with torch.inference_mode():
            batched = layer(inputs)
            rows_alike = _rounds_rows_alike(layer, inputs, batched)
    except (RuntimeError, AttributeError) as exc:  # an op missing or renamed in this torch
        return f"oneDNN's packed linear failed in {name} in this PyTorch {torch.__version__} ({exc})"
    expected = nn.functional.linear(inputs.float(), weight.float())
    tolerance = _MATCH_TOLERANCE[dtype]
    if not torch.allclose(batched.float(), expected, rtol=tolerance, atol=tolerance):
        return f"oneDNN's packed linear in {name} does not match F.linear in this PyTorch"
    if not rows_alike:
        return "oneDNN's packed linear rounds a row differently in a batch than alone"
    return None


def _rounds_rows_alike(layer: PackedLinear, inputs: torch.Tensor, batched: torch.Tensor) -> bool:
    """Check that `layer` gives each row of `inputs` alone exactly its row of `batched`."""
    return all(torch.equal(layer(inputs[i:i + 1]), batched[i:i + 1]) for i in range(len(inputs)))


def batch_dependent_shape(modules: Iterable[nn.Linear], rows: int = 16,
                          dtype: torch.dtype = torch.float32) -> str | None:
    """Return the first shape among `modules` whose packed rows round differently alone than
    in a batch of `rows`, or None when every shape is row-invariant.

    Packs one layer of each shape in `dtype` with its own weights, because oneDNN picks its
    kernels by shape, dtype and what the CPU supports. The check runs on the calling
    thread's intra-op threads only.
    """
    checked: set[tuple[int, int]] = set()
    for module in modules:
        if tuple(module.weight.shape) in checked:
            continue
        checked.add(tuple(module.weight.shape))
        layer = PackedLinear.from_linear(module, dtype)
        if not rounds_rows_alike(layer, rows):
            return f"{layer.out_features} x {layer.in_features}"
    return None


def rounds_rows_alike(layer: PackedLinear, rows: int = 16) -> bool:
    """Check that `layer` rounds each of `rows` random rows alone exactly as in one call with all of them."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(rows, layer.in_features, generator=generator).to(layer.dtype)
    with torch.inference_mode():
        return _rounds_rows_alike(layer, inputs, layer(inputs))


def pack_model(model: nn.Module, layout: str = "mkldnn") -> int:
    """Replace every nn.Linear of `model` by a float32 `PackedLinear`; return how many.

    With `layout` "panels", a layer whose output size is not a multiple of `PANEL` takes
    oneDNN's layout instead. The output layer is packed too. When it shares its weight with
    the token embeddings, the packed copy costs one more copy of that matrix. Hooks on the
    replaced layers are not carried over, so register them after packing.
    """
    # Names only, so that each replaced layer's weight can be freed before the next is packed.
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, attribute)
        fits = layout == "panels" and module.out_features % PANEL == 0
        setattr(parent, attribute, PackedLinear.from_linear(module, layout="panels" if fits else "mkldnn"))
    return len(names)


@functools.cache
def _panel_product():
    """Return the AVX2 product's operator, loading it first (as after `torch.load` in a new process).

    Raises RuntimeError with the reason where it cannot serve.
    """
    problem = panel_blocker()
    if problem:
        raise RuntimeError(f"The AVX2 float32 product cannot serve here ({problem}); pack with layout mkldnn")
    return torch.ops.senab_avx2.f32_mm


@functools.cache
def panel_blocker() -> str | None:
    """Return why the compiled AVX2 product (`layout="panels"`) cannot serve here, or None when it can.

    Builds it on first use. A self-check against a float64 product, across passes, chunks
    and tiles of rows, then decides whether it serves.
    """
    missing = [flag for flag in PANEL_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    problem = native.load(PANEL_SOURCE, PANEL_FLAGS, "senab_avx2::f32_mm")
    if problem:
        return problem
    generator = torch.Generator().manual_seed(0)
    # 1,100 inputs: 5 chunks of the kernel's 256, and tiles of 42 rows, so 50 rows cross one.
    weight = torch.randn(48, 1100, generator=generator)
    bias = torch.randn(48, generator=generator)
    inputs = torch.randn(50, 1100, generator=generator)
    panels = weight.reshape(-1, PANEL, weight.shape[1]).transpose(1, 2).contiguous()
    operator = torch.ops.senab_avx2.f32_mm
    try:
        with torch.inference_mode():
            batched = operator(inputs, panels, bias)
            rows_alike = all(torch.equal(operator(inputs[i:i + 1], panels, bias), batched[i:i + 1]) for i in range(9)) \
                and torch.equal(operator(inputs[40:50].contiguous(), panels, bias), batched[40:50])
    except (RuntimeError, AttributeError) as exc:
        return f"the AVX2 float32 product failed its self-check: {exc}"
    expected = inputs.double() @ weight.double().t() + bias.double()
    error = ((batched.double() - expected).abs().max() / expected.abs().max()).item()
    # Float32 sums of 1,100 products round to about 1e-7 of the largest output (an estimate), so a wrong
    # product is off by far more.
    if not error <= 1e-5:
        return f"the AVX2 float32 product is off by {error:.3g} of its largest output in its self-check"
    if not rows_alike:
        return "the AVX2 float32 product rounds a row differently in a batch than alone"
    return None
