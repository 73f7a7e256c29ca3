"""4-bit weights for decoding on a CPU.

Decoding one token reads every weight once, so on a CPU its speed is set by the bytes of
the weights. The default model ships as a Q4_1 GGUF file: every linear weight of its
decoder layers is stored as 4-bit codes in groups of 32 input values, each group with its
own scale d and minimum m (w = d * q + m, q in 0..15). `senab models pull` dequantizes it to
float32, and serving it in bfloat16 reads 2 bytes per weight where the file stores about
0.6 (4 bits plus two 16-bit numbers per 32 weights).

`quantize_model` finds those groups again in the float32 weights and runs each linear layer
through PyTorch's 4-bit matrix product for CPUs (`aten._weight_int4pack_mm_for_cpu`, groups
of 32 along the input dimension, w = (q - 8) * scale + zero). For a Q4_1 source the codes,
scales and minimums come back exactly, so the model computes what the float32 model
computes, up to the rounding of scale and zero to the activation dtype.

Modes: "none" keeps the dense weights. "int4" quantizes every eligible layer, exact or not;
for weights not already on a 4-bit grid this loses accuracy, as any 4-bit quantization
does. "auto" quantizes only when the model runs on a CPU in bfloat16 and every eligible
layer is exact, so it never changes what the model computes beyond rounding. The output
layer (the token embeddings in tied models, 8-bit in the Q4_1 file) keeps its values. Where
4-bit weights cannot run and the model runs on a CPU in float32, "auto" packs the dense
weights for the compiled AVX2 float32 product, or for oneDNN where that does not serve
(`senab.packed`).

The kernel is vectorized for bfloat16 activations only: on a 2-core AVX-512 machine the
30 layers of SmolLM2-135M took 4.9 ms per token in bfloat16 and 102 ms in float32, against
21 ms for dense bfloat16 weights. So int4 requires bfloat16. Per token it also costs
more as the batch grows (4.9 ms for 1 row, 23 ms for 16), because it unpacks the weights
again for every 4 rows. Dense bfloat16 took 29 ms for 16 rows.

On a CPU with AMX tiles, bfloat16 weights packed for oneDNN cost the same for any number
of rows: on a 2-core Xeon with AMX the 210 layers took 12.4 ms for 1 row and for 16, the
4-bit kernel 5.5 and 27.5 ms. There "auto" keeps a packed bfloat16 copy of every 4-bit
layer, and a layer runs the 4-bit kernel for decode steps of up to `INT4_MAX_ROWS` rows and
the copy for larger steps and for prompts. The two round differently, so in this mode a
row's logits can change in the last bits when the batch crosses that size. The copy also
rounds a row differently in calls of more than about 32 rows (on that machine), which
a prefill of several prompts can be. "int4" keeps every product on the 4-bit kernel.
Where a 4-bit product for batches builds (`senab.int4_batch`: on AMX tiles, or on AVX-512
BF16 without AMX), the decode steps it takes (5 to 16 rows on AMX, 5 or more on AVX-512)
run on it instead of the kernel or the copy: it unpacks each weight once per call for all
rows. With copies, the copy then serves only prompts and steps of more than 16 rows.
Without copies, prompts run on the AVX-512 product too, whatever their length. With copies
the output layer is packed in bfloat16 too (`PackedOutputLayer`). Timed alone, its 49K x 576 product for one row took 1.9 ms against
3.7 ms for `F.linear` on the plain bfloat16 weight. Inside a decode step, which reads its 57 MB from memory, it took 3 to
4.6 ms of 16 to 20.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from senab import int4_batch
from senab.int4_batch import BatchProduct
from senab.packed import (
    PANEL, PackedLinear, amx_blocker, batch_dependent_shape, output_packing_blocker, pack_model, packing_blocker,
    panel_blocker, rounds_rows_alike,
)

logger = logging.getLogger(__name__)

Quantization = Literal["auto", "none", "int4"]
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int4")
GROUP_SIZE = 32
LEVELS = 15  # largest 4-bit code
# Rounding of the float32 dequantization leaves relative errors near 1e-7. A grid that
# does not fit the weights leaves errors near half a quantization step, about 3% of a
# group's range. The threshold sits far from both.
EXACT_TOLERANCE = 1e-4
_KERNEL = "_weight_int4pack_mm_for_cpu"
_INT4_MM = getattr(torch.ops.aten, _KERNEL).default if hasattr(torch.ops.aten, _KERNEL) else None
# The kernel unpacks the weights again for every 4 rows, so over many positions (a long
# prompt) unpacking them once and running a dense product is faster. On a 2-core AVX-512
# machine, one forward pass of SmolLM2-135M over 600 positions took 999 ms with the kernel
# and 737 ms unpacked, over 256 positions 412 and 411 ms (unpacking alone about 200 ms).
# The choice goes by positions per sequence, not rows in the call, so that a prompt's
# numerics do not depend on the prompts prefilled with it.
UNPACK_POSITIONS = 512
# Decode steps of up to this many rows run on the 4-bit kernel where a layer also has a
# packed bfloat16 copy. On a 2-core Xeon with AMX we timed paired steps of SmolLM2-135M
# through `senab.fastdecode`, with q/k/v and gate/up fused (4-bit kernel / packed copy, ms).
# They took 15.6 / 28.7 for 1 row, 27.4 / 41.4 for 4, 30.5 / 33.3 for 8, 37.7 / 33.9 for 10
# and 47.6 / 37.5 for 16. Through transformers' forward call, without the fusion, the two
# cost about the same at 6 rows. Where the AMX product serves, it takes steps of 5 to 16 rows.
INT4_MAX_ROWS = 8
# Rows per block of the kernel's packed layout: 64 where torch 2.13 runs it with AVX-512,
# 32 with AVX2. `packed_block` finds out which one this process uses.
_PACK_BLOCKS = (64, 32)


class QuantizationError(ValueError):
    """A quantization mode that cannot run here; the message names the value and the fix."""


@dataclass(frozen=True)
class GroupwiseGrid:
    """4-bit codes with a scale and minimum per group of `GROUP_SIZE` input values."""

    codes: torch.Tensor  # (N, K) int32 in 0..LEVELS
    scales: torch.Tensor  # (N, K / GROUP_SIZE) float32
    minimums: torch.Tensor  # (N, K / GROUP_SIZE) float32
    relative_error: float  # largest |dequantized - weight| over the range of its group

    @property
    def exact(self) -> bool:
        return self.relative_error <= EXACT_TOLERANCE


def groupwise_grid(weight: torch.Tensor) -> GroupwiseGrid:
    """Fit codes, scales and minimums to `weight` (N, K) from each group's minimum and maximum.

    A Q4_1 quantizer maps a group's minimum to code 0 and its maximum to code 15, so for
    weights dequantized from Q4_1 these are the original codes, scales and minimums.
    """
    rows, columns = weight.shape
    groups = weight.detach().float().reshape(rows, columns // GROUP_SIZE, GROUP_SIZE)
    minimums = groups.amin(-1)
    spans = groups.amax(-1) - minimums
    scales = torch.where(spans > 0, spans / LEVELS, torch.ones_like(spans))
    codes = torch.round((groups - minimums[..., None]) / scales[..., None]).clamp_(0, LEVELS)
    error = (codes * scales[..., None] + minimums[..., None] - groups).abs().amax(-1)
    relative = (error / torch.where(spans > 0, spans, torch.ones_like(spans))).max().item()
    return GroupwiseGrid(codes.reshape(rows, columns).to(torch.int32), scales, minimums, relative)


def int4_kernel_available() -> bool:
    return _INT4_MM is not None


@functools.cache
def packed_block() -> int | None:
    """Return the rows per block of this torch's int4 packing, or None for a layout `unpack` cannot read.

    Checked once per process, by unpacking random codes with each known block size.
    """
    generator = torch.Generator().manual_seed(0)
    rows = 2 * max(_PACK_BLOCKS)
    codes = torch.randint(0, LEVELS + 1, (rows, GROUP_SIZE * 2), generator=generator, dtype=torch.int32)
    ones, zeros = torch.ones(rows, 2), torch.zeros(rows, 2)
    layer = Int4Linear(GroupwiseGrid(codes, ones, zeros, 0.0), None)
    expected = layer.dequantized_weight()
    for block in _PACK_BLOCKS:
        if torch.equal(layer.unpack(block), expected):
            return block
    return None


def int4_ineligible(module: nn.Linear) -> str | None:
    """Return why the CPU kernel cannot run `module`, or None when it can."""
    out_features, in_features = module.weight.shape
    if in_features % GROUP_SIZE:
        return f"input size {in_features} is not a multiple of {GROUP_SIZE}"
    if out_features % 16:
        return f"output size {out_features} is not a multiple of 16"
    if module.weight.device.type != "cpu":
        return f"weights are on {module.weight.device}"
    return None


class Int4Linear(nn.Module):
    """A linear layer whose weight is 4-bit groupwise codes, for CPU inference.

    The packed codes are a uint8 buffer (2 codes per byte, in the kernel's tiled layout).
    `scales_and_zeros` (K / 32, N, 2) follows the model's dtype through `.to(dtype)`. It must
    match the activations' dtype, because the kernel takes both in one dtype.

    `dense`, when set, is a packed bfloat16 copy of the weight. It serves every call with
    more than one position per sequence (prompts) and every call of more than
    `INT4_MAX_ROWS` rows, so a prompt takes the same method whatever else is prefilled with
    it (the copy's rounding can still change with the rows in the call). Outputs come in the
    dtype of `scales_and_zeros` on both paths.
    """

    dense: PackedLinear | None
    # The product that runs the calls its `serves` accepts, set by `quantize_model` where one
    # serves. The copy then serves only prompts and decode steps larger than the product takes.
    batch_product: BatchProduct | None

    def __init__(self, grid: GroupwiseGrid, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.dense = None
        self.batch_product = None
        self.out_features, self.in_features = grid.codes.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(grid.codes, 1))
        # The kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale.
        zeros = grid.minimums + 8 * grid.scales
        self.register_buffer("scales_and_zeros", torch.stack([grid.scales.t(), zeros.t()], -1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear, grid: GroupwiseGrid | None = None) -> Int4Linear:
        return cls(grid or groupwise_grid(module.weight), module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales_and_zeros
        flat = x.reshape(-1, self.in_features)
        positions = x.shape[-2] if x.dim() >= 3 else 1
        if self.copy_serves(flat.shape[0], positions):
            # In the dtype the 4-bit path returns, so that a model cast to float32 still runs.
            return self.dense(x).to(scales.dtype)
        if flat.dtype != scales.dtype:
            flat = flat.to(scales.dtype)
        product = self.batch_product
        on_product = product is not None and product.serves(flat.shape[0], positions)
        block = packed_block() if positions >= UNPACK_POSITIONS and not on_product else None
        if block is not None and self.out_features % block == 0:
            out = nn.functional.linear(flat, self.unpack(block))
            if self.bias is not None:
                out = out + self.bias
        else:
            out = self.kernel(flat.contiguous(), positions)
        return out.reshape(*x.shape[:-1], self.out_features)

    def kernel(self, flat: torch.Tensor, positions: int = 1) -> torch.Tensor:
        """Return the (rows, out) product of contiguous (rows, in) `flat` on the 4-bit kernel, bias added.

        `flat` must be in the dtype of `scales_and_zeros`; its rows are `positions` per
        sequence. `forward` calls this, and `senab.fastdecode` calls it directly for decode
        steps, skipping `forward`'s checks. Runs the batch product where it serves this layer
        and the call (see `batch_product`).
        """
        product = self.batch_product
        if product is not None and product.serves(flat.shape[0], positions) \
                and flat.dtype == torch.bfloat16 and self.scales_and_zeros.dtype == torch.bfloat16:
            out = product(flat, self.packed, self.scales_and_zeros)
        else:
            out = _INT4_MM(flat, self.packed, GROUP_SIZE, self.scales_and_zeros)
        return out if self.bias is None else out + self.bias

    def step_kernel(self, rows: int, dtype: torch.dtype):
        """Return a function of contiguous (rows, in) `dtype` inputs that computes `kernel` for decode steps of `rows` rows.

        It makes `kernel`'s choice once, for callers that run many steps of the same rows.
        None where a bias, another dtype or the dense copy needs `forward`.
        """
        if self.bias is not None or self.scales_and_zeros.dtype != dtype or self.copy_serves(rows, 1):
            return None
        packed, scales = self.packed, self.scales_and_zeros
        product = self.batch_product
        if product is not None and product.serves(rows, 1) and dtype == torch.bfloat16:
            operator = product._operator
            return lambda flat: operator(flat, packed, scales)
        return lambda flat: _INT4_MM(flat, packed, GROUP_SIZE, scales)

    def copy_serves(self, rows: int, positions: int) -> bool:
        """Return whether a call of `rows` rows of `positions` positions each runs on the dense copy."""
        product = self.batch_product
        largest = INT4_MAX_ROWS if product is None else product.max_rows or math.inf
        return self.dense is not None and (positions > 1 or rows > largest)

    @classmethod
    def concatenate(cls, layers: Sequence[Int4Linear]) -> Int4Linear | None:
        """Return one layer whose output is the outputs of `layers` side by side, or None.

        The kernel's layout tiles the codes in blocks of output rows (`packed_block`), so
        layers whose output sizes are whole blocks concatenate block by block, and each output
        is computed as its own layer computes it. One product instead of three saved 0.06 ms
        per layer for the q, k and v projections of SmolLM2-135M (2-core Xeon, one row). Where
        every layer has a dense copy, the result has one too, of the copies' weights read back
        exactly, so that it serves the same calls as they do with the same outputs. None where
        the layers differ in input size, dtype, bias or copies, or an output size is not whole
        blocks.
        """
        block = packed_block()
        first = layers[0]
        dtype = first.scales_and_zeros.dtype
        if block is None or any(
                layer.in_features != first.in_features or layer.out_features % block
                or layer.scales_and_zeros.dtype != dtype or (layer.bias is None) != (first.bias is None)
                or (layer.dense is None) != (first.dense is None)
                for layer in layers):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.dense = None
        products = {layer.batch_product for layer in layers}
        fused.batch_product = products.pop() if len(products) == 1 else None
        if first.dense is not None:
            bias = None if first.dense.bias is None else torch.cat([layer.dense.bias.detach() for layer in layers])
            weight = torch.cat([layer.dense.unpacked_weight() for layer in layers])
            fused.dense = PackedLinear(weight, bias, first.dense.dtype)
        fused.in_features = first.in_features
        fused.out_features = sum(layer.out_features for layer in layers)
        fused.register_buffer("packed", torch.cat([layer.packed for layer in layers]))
        fused.register_buffer("scales_and_zeros", torch.cat([layer.scales_and_zeros for layer in layers], 1))
        fused.bias = None if first.bias is None else nn.Parameter(
            torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
        return fused

    def unpack(self, block: int) -> torch.Tensor:
        """Return the (N, K) weight in the scales' dtype, unpacked from the codes with tensor ops.

        `block` is the rows per block of the packed layout (see `packed_block`); N must be a
        multiple of it. Per block and per input k, the kernel's packing (torch 2.13) stores
        block / 2 bytes whose low nibbles are the block's first half of rows and whose high
        nibbles are its second half.
        """
        rows, columns = self.out_features, self.in_features
        packed = self.packed.view(rows // block, columns, block // 2)
        codes = torch.cat([packed & 0xF, packed >> 4], dim=-1).transpose(1, 2)  # (N / block, block, K)
        codes = codes.reshape(rows, columns // GROUP_SIZE, GROUP_SIZE).to(self.scales_and_zeros.dtype)
        scales = self.scales_and_zeros[..., 0].t().unsqueeze(-1)  # (N, K / 32, 1)
        offsets = (self.scales_and_zeros[..., 1] - 8 * self.scales_and_zeros[..., 0]).t().unsqueeze(-1)
        return torch.addcmul(offsets, codes, scales).reshape(rows, columns)

    def dequantized_weight(self) -> torch.Tensor:
        """Return the (N, K) float32 weight this layer multiplies by (for tests and inspection)."""
        identity = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(identity, self.packed, GROUP_SIZE,
                                                          self.scales_and_zeros).t().float()

    def keep_dense_copy(self, weight: torch.Tensor) -> None:
        """Keep `weight` (the layer's (N, K) weight) packed in bfloat16 for batches and prompts."""
        bias = None if self.bias is None else self.bias.detach()
        self.dense = PackedLinear(weight, bias, torch.bfloat16)

    def extra_repr(self) -> str:
        copy = ", dense copy in bfloat16" if self.dense is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}{copy}"


@dataclass
class QuantizationReport:
    """Outcome of `quantize_model`: the mode in effect and the reason for it."""

    requested: str
    applied: Literal["none", "int4", "packed"] = "none"
    reason: str = ""
    layers: int = 0
    exact: bool = True
    relative_error: float = 0.0  # largest over the quantized layers
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed dense
    dense_copies: bool = False  # int4 layers keep a packed bfloat16 copy for batches and prompts
    packed_output: bool = False  # the output layer runs packed in bfloat16 (`output_packing_blocker`)
    dense_copies_reason: str = ""  # why they do not, when int4 layers run without one
    batch_product: str = ""  # the 4-bit product for decode batches in use (`senab.int4_batch`), if any
    batch_product_reason: str = ""  # why none is, where int4 applies in auto mode
    packed_layout: str = ""  # where applied is "packed": "panels" (the AVX2 product) or "mkldnn" (oneDNN)
    panels_reason: str = ""  # why the AVX2 product does not serve, where oneDNN's layout does
    onednn_layers: int = 0  # of `layers`, those in oneDNN's layout beside panels (output size not a multiple of 16)

    def describe(self) -> str:
        if self.applied == "none":
            return f"dense weights ({self.reason})" if self.reason else "dense weights"
        if self.applied == "packed":
            if self.packed_layout != "panels":
                return f"dense float32 weights packed for oneDNN in {self.layers} layers"
            if self.onednn_layers:
                return (f"dense float32 weights packed for the AVX2 float32 product in "
                        f"{self.layers - self.onednn_layers} layers and for oneDNN in {self.onednn_layers}")
            return f"dense float32 weights packed for the AVX2 float32 product in {self.layers} layers"
        exactness = "exact" if self.exact else f"lossy, up to {self.relative_error:.1%} of a group's range"
        text = f"int4 weights in {self.layers} layers ({exactness})"
        product = next((product for product in int4_batch.PRODUCTS if product.name == self.batch_product), None)
        if self.dense_copies:
            largest = INT4_MAX_ROWS if product is None else product.max_rows
            text += ", with bfloat16 copies packed for oneDNN for prompts"
            text += f" and decode steps of more than {largest} rows" if largest else ""
        if product is not None:
            text += f", {product.describe(with_prompts=not self.dense_copies)}"
        if self.packed_output:
            text += "; output layer packed in bfloat16"
        return text


def _candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """List every nn.Linear of the model except the output layer, with its name."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output]


def _output_layer(model: nn.Module) -> nn.Linear | None:
    """Return the model's output layer when it is a plain CPU nn.Linear that can be packed."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(output) is not nn.Linear or output.weight.device.type != "cpu" or \
            not hasattr(model, "set_output_embeddings"):
        return None
    return output


class PackedOutputLayer(nn.Module):
    """The output layer, packed in bfloat16 for oneDNN, returning logits in the model's dtype.

    The packed copy is separate from the token embeddings even when the model ties them,
    so it costs one more copy of that matrix (57 MB for SmolLM2-135M). `like` is an empty
    buffer that follows `.to(dtype)`, so a model cast to float32 still gets float32 logits.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = PackedLinear(linear.weight, linear.bias, torch.bfloat16)
        self.register_buffer("like", torch.empty(0, dtype=linear.weight.dtype), persistent=False)
        self.in_features, self.out_features = self.packed.in_features, self.packed.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x).to(self.like.dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def int4_blocker(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Return why int4 weights cannot run on `device` in `dtype`, or None when they can.

    Raises QuantizationError for an unknown mode, and for "int4" when they cannot run.
    """
    if mode not in QUANTIZATIONS:
        raise QuantizationError(f"Invalid quantization {mode!r}: use one of {', '.join(QUANTIZATIONS)}")
    fix = "set quantization to auto or none"
    if device.type != "cpu":
        problem = f"the model runs on {device} and the 4-bit kernel is for CPUs"
    elif dtype != torch.bfloat16:
        problem = f"the model runs in {str(dtype).removeprefix('torch.')} and the 4-bit kernel is fast only in bfloat16"
        fix = "set dtype to bfloat16, or quantization to auto or none"
    elif not int4_kernel_available():
        problem = f"this PyTorch {torch.__version__} has no {_KERNEL}"
    else:
        return None
    if mode == "int4":
        raise QuantizationError(f"Cannot use int4 weights: {problem}; {fix}")
    return problem


def quantize_model(model: nn.Module, mode: str, dtype: torch.dtype = torch.bfloat16) -> QuantizationReport:
    """Replace the model's linear layers by `Int4Linear` or `PackedLinear` as `mode` requests.

    `dtype` is the dtype the model will run in (cast it afterwards). Call this on float32
    weights: weights already rounded to bfloat16 are no longer on their 4-bit grid, so
    "auto" would keep them dense. Raises QuantizationError when "int4" is asked for where
    it cannot run.
    """
    report = QuantizationReport(requested=mode)
    device = next(model.parameters()).device
    problem = int4_blocker(mode, device, dtype)
    if mode == "none":
        report.reason = "quantization none"
        return report
    if mode == "auto" and problem:
        # Where 4-bit weights cannot run, auto takes the next fastest exact format: float32
        # weights in panels for the compiled AVX2 product, else in oneDNN's layout.
        if device.type == "cpu" and dtype == torch.float32:
            report.panels_reason = panel_blocker() or _odd_layers_blocker(model, device)
            if not report.panels_reason:
                report.applied, report.packed_layout = "packed", "panels"
                report.onednn_layers = sum(type(m) is nn.Linear and m.out_features % PANEL != 0
                                           for m in model.modules())
                report.layers = pack_model(model, "panels")
                return report
            logger.info("float32 weights are not packed for the AVX2 product: %s", report.panels_reason)
        packing_problem = packing_blocker(device, dtype)
        if packing_problem is None:
            shape = batch_dependent_shape(m for m in model.modules() if type(m) is nn.Linear)
            if shape is not None:
                packing_problem = f"oneDNN's packed linear rounds {shape} rows differently in a batch than alone"
        if packing_problem is None:
            report.applied, report.packed_layout = "packed", "mkldnn"
            report.layers = pack_model(model)
            return report
        report.reason = f"{problem}, and {packing_problem}"
        return report

    names: list[str] = []
    for name, module in _candidates(model):
        reason = int4_ineligible(module)
        if reason is None:
            names.append(name)
        else:
            report.skipped[name] = reason
    if not names:
        report.reason = "no linear layer fits the 4-bit kernel"
        if mode == "int4":
            raise QuantizationError(f"Cannot use int4 weights: {report.reason} ({_first_skip(report)}); "
                                    "set quantization to auto or none")
        return report
    if mode == "auto":
        # Every layer is checked before any is replaced, so that each float32 weight can be
        # freed as soon as its own layer is replaced. Fitting a grid costs about 0.3 s for
        # the 210 layers of SmolLM2-135M.
        for name in names:
            grid = groupwise_grid(model.get_submodule(name).weight)
            if not grid.exact:
                report.reason = (f"{name} is not on a 4-bit grid of {GROUP_SIZE} "
                                 f"(error {grid.relative_error:.1%} of a group's range)")
                return report
        report.dense_copies_reason = _dense_copies_blocker([model.get_submodule(name) for name in names]) or ""
        report.dense_copies = not report.dense_copies_reason
        product, report.batch_product_reason = int4_batch.batch_product()
        report.batch_product = product.name if product else ""
        if product is None:
            logger.info("decode steps of several rows run on %s: no 4-bit product for batches serves (%s)",
                        "PyTorch's 4-bit kernel and the bfloat16 copies" if report.dense_copies
                        else "PyTorch's 4-bit kernel", report.batch_product_reason)
    else:
        product = None

    # Layer by layer, so that only one layer's codes exist at a time.
    errors: list[float] = []
    for name in names:
        module = model.get_submodule(name)
        grid = groupwise_grid(module.weight)
        layer = Int4Linear(grid, module.bias)
        if report.dense_copies:
            layer.keep_dense_copy(module.weight)
        if product is not None and layer.out_features % int4_batch.BLOCK == 0:
            layer.batch_product = product
        _set_module(model, name, layer)
        errors.append(grid.relative_error)

    output = _output_layer(model)
    if output is not None and mode == "auto" and (report.dense_copies or output_packing_blocker() is None):
        # Packed after the decoder layers, whose float32 weights are freed by now, so that
        # the load does not peak higher. Kept dense if its shape rounds rows by batch.
        packed_output = PackedOutputLayer(output)
        if rounds_rows_alike(packed_output.packed):
            model.set_output_embeddings(packed_output)
            report.packed_output = True
        else:
            logger.info("the output layer stays dense: oneDNN's packed linear rounds its %d x %d rows differently "
                        "in a batch than alone in bfloat16", output.out_features, output.in_features)

    report.applied = "int4"
    report.layers = len(names)
    report.relative_error = max(errors)
    report.exact = report.relative_error <= EXACT_TOLERANCE
    if report.skipped:
        logger.info("%d linear layers stay dense: %s", len(report.skipped), _first_skip(report))
    if not report.exact:
        logger.warning("int4 weights round the model's weights by up to %.1f%% of a group's range; "
                       "quantization auto keeps such a model dense", 100 * report.relative_error)
    return report


def _odd_layers_blocker(model: nn.Module, device: torch.device) -> str:
    """Return why oneDNN cannot take the layers that panels cannot (output size not a multiple of 16).

    Returns "" when there are no such layers or oneDNN can take them.
    """
    odd = [m for m in model.modules() if type(m) is nn.Linear and m.out_features % PANEL]
    if not odd:
        return ""
    problem = packing_blocker(device, torch.float32)
    if problem is None:
        shape = batch_dependent_shape(odd)
        if shape is not None:
            problem = f"oneDNN's packed linear rounds {shape} rows differently in a batch than alone"
    return f"layers of other output sizes than multiples of {PANEL} cannot go to oneDNN: {problem}" if problem else ""


def _dense_copies_blocker(modules: list[nn.Module]) -> str | None:
    """Return why 4-bit layers should not keep a packed bfloat16 copy here, or None when they should."""
    problem = amx_blocker()
    if problem is None:
        shape = batch_dependent_shape(modules, dtype=torch.bfloat16)
        if shape is not None:
            problem = f"oneDNN's packed linear rounds {shape} rows differently in a batch than alone in bfloat16"
    return problem


def _first_skip(report: QuantizationReport) -> str:
    name, reason = next(iter(report.skipped.items()), ("", ""))
    return f"{name}: {reason}" if name else "no linear layers"
