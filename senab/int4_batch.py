"""4-bit matrix products for decode steps of several rows: on AMX tiles, or on AVX-512 BF16.

PyTorch's 4-bit CPU kernel unpacks the weights again for every 4 rows, so a decode step of
16 rows costs it about 4 to 5 times one row. The two products here read the same 4-bit
layers' codes, scales and zeros, so they add no memory. They unpack each weight once for
many rows (16 on AMX tiles, 64 on AVX-512) and multiply all of them with it:

- `AMX` (`senab/csrc/int4_amx.cpp`) unpacks into bfloat16 weights in L1 and multiplies on
  AMX tiles. On a 2-core Xeon with a 300 MB L3 it took 6.4 to 8.8 ms for the 210 layers of
  SmolLM2-135M at 1 to 16 rows. PyTorch's kernel took 4.5 ms at 1 row and 27 ms at 16, the
  packed bfloat16 copies 13 to 15 ms.
- `AVX512` (`senab/csrc/int4_avx512.cpp`), for CPUs with AVX-512 BF16 but no AMX, unpacks
  each code into the bfloat16 128 + q with two bit operations, multiplies with `vdpbf16ps`
  and applies each group's scale and zero after the group's sums. On a 2-core AMD EPYC
  (Zen 4) it took 8.1 ms for 8 rows and 13.3 ms for 16, against 11.5 and 21.5 ms for
  PyTorch's kernel in the same run. At 16 rows that is about the rate at which the cores
  retire `vdpbf16ps` (1.76e9 per second per core, measured alone). It takes any number of
  rows, so it serves prompts too.

`senab.native` compiles a product at its first use. A self-check against a float64 product
and a row-invariance check then decide whether it serves. `batch_product` returns the first
one that serves here, AMX first, and the reasons of those that do not. Where none does (no
such CPU, no compiler, `SENAB_NATIVE_KERNELS=0`), PyTorch's kernel or the copies serve.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from senab import native
from senab.packed import cpu_flags

AMX_ROWS = 16  # rows of an AMX tile, the most the AMX product takes per call
BLOCK = 64  # outputs per block of PyTorch's 4-bit layout with AVX-512, which both read
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16")
_AVX512_CPU_FLAGS = ("avx512_bf16", "avx512bw", "avx512vl", "avx512dq")
# The self-check's largest error allowed, relative to the largest output: each output is
# rounded to bfloat16 (8 significant bits), and the AMX product rounds each weight too, so
# a few 2^-8 at most.
_CHECK_TOLERANCE = 2e-2


@dataclass(frozen=True)
class BatchProduct:
    """One compiled 4-bit product: its source, what it needs, and the decode steps it takes."""

    name: str  # as logs and reports name it
    source: str  # a file in senab/csrc
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags it needs
    operator: str  # "namespace::name" its library defines
    # Decode steps of `min_rows` to `max_rows` rows (None: no limit) run on the product. Fewer
    # rows stay on PyTorch's kernel, because it is as fast or faster there (see each product).
    min_rows: int
    max_rows: int | None
    prompts: bool  # calls of several positions per sequence (prompts) run on it too, whatever their rows

    def serves(self, rows: int, positions: int) -> bool:
        """Return whether a call of `rows` rows of `positions` positions each runs on this product."""
        if positions > 1:
            return self.prompts
        return self.min_rows <= rows and (self.max_rows is None or rows <= self.max_rows)

    def describe(self, with_prompts: bool = True) -> str:
        """Return what runs on this product, for the start-up log; `with_prompts` False where copies take prompts."""
        steps = (f"decode steps of {self.min_rows} or more rows" if self.max_rows is None
                 else f"decode steps of {self.min_rows} to {self.max_rows} rows")
        prompts = "prompts and " if self.prompts and with_prompts else ""
        return f"{prompts}{steps} on the {self.name} 4-bit product"

    def blocker(self) -> str | None:
        """Return why this product cannot serve in this process, or None when it can (builds it on first use)."""
        return _load(self)

    def build(self) -> Path:
        """Compile the product unless it is cached, and return the library (for images built ahead)."""
        return native.build(self.source, self.flags)

    def __call__(self, flat: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        """Return the (rows, N) bfloat16 product of contiguous bfloat16 (rows, K) `flat` with 4-bit weights.

        `packed` and `scales_and_zeros` are an `Int4Linear`'s buffers. `flat` has at least one
        row, and at most `max_rows` where that is set. Call `blocker` first: the operator
        exists only after it returned None.
        """
        return self._operator(flat, packed, scales_and_zeros)

    @functools.cached_property
    def _operator(self):
        """The registered operator, looked up once rather than at each of a step's 120 calls."""
        namespace, name = self.operator.split("::")
        return getattr(getattr(torch.ops, namespace), name)


AMX = BatchProduct(
    name="AMX", source="int4_amx.cpp",
    flags=(*native.COMMON_FLAGS, "-fopenmp", *_AVX512_FLAGS, "-mamx-tile", "-mamx-bf16"),
    cpu_flags=("amx_tile", "amx_bf16", *_AVX512_CPU_FLAGS), operator="senab::int4_mm",
    # Paired steps of SmolLM2-135M with the bridge on a 2-core Xeon with a 300 MB L3, without
    # and with the AMX product (the copies served above 8 rows without it): 13.9 and 16.6 ms
    # for 2 rows, 17.7 and 18.4 for 4, 24.0 and 18.8 for 8, 30.3 and 24.3 for 16.
    # NOTE: measured on that machine kind only; a CPU whose L3 does not hold the 4-bit
    # weights may favour another threshold.
    min_rows=5, max_rows=AMX_ROWS, prompts=False)
AVX512 = BatchProduct(
    name="AVX-512 BF16", source="int4_avx512.cpp", flags=(*native.COMMON_FLAGS, "-fopenmp", *_AVX512_FLAGS),
    cpu_flags=_AVX512_CPU_FLAGS, operator="senab_avx512::int4_mm",
    # The 210 layers of SmolLM2-135M on a 2-core AMD EPYC (Zen 4), medians of 11 interleaved
    # runs, PyTorch's kernel and then this product: 4.62 and 5.12 ms for 1 row, 5.16 and 5.35
    # for 2, 5.97 and 6.54 for 3, 6.82 and 5.78 for 4, 11.76 and 6.26 for 5. One row's sums
    # form only 2 dependent chains here, which is why it loses at 1 row.
    min_rows=4, max_rows=None, prompts=True)
PRODUCTS = (AMX, AVX512)


def batch_product() -> tuple[BatchProduct | None, str]:
    """Return the first product of `PRODUCTS` that serves here, or None and every product's reason."""
    reasons = []
    for product in PRODUCTS:
        problem = product.blocker()
        if problem is None:
            return product, ""
        reasons.append(f"{product.name}: {problem}")
    return None, "; ".join(reasons)


@functools.cache
def _load(product: BatchProduct) -> str | None:
    # The environment's switch comes first, so that it is the reason given wherever it is set.
    switched_off = native.switched_off()
    if switched_off:
        return switched_off
    missing = [flag for flag in product.cpu_flags if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    from senab.quant import packed_block  # here, because senab.quant imports this module

    block = packed_block()
    if block != BLOCK:
        return f"this torch packs 4-bit weights in blocks of {block} outputs, not {BLOCK}"
    return native.load(product.source, product.flags, product.operator) or _self_check(product)


def _self_check(product: BatchProduct) -> str | None:
    """Check the built operator against a float64 product of the same 4-bit weights, and row invariance."""
    generator = torch.Generator().manual_seed(0)
    out_features, in_features = 2 * BLOCK, 96
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.int32)
    scales = (torch.rand(in_features // 32, out_features, generator=generator) / 8 + 0.01).to(torch.bfloat16)
    zeros = torch.randn(in_features // 32, out_features, generator=generator).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([scales, zeros], -1).contiguous()
    group_scales = scales.float().repeat_interleave(32, 0).t()  # (N, K)
    group_zeros = zeros.float().repeat_interleave(32, 0).t()
    weight = ((codes.float() - 8) * group_scales + group_zeros).double()
    flat = torch.randn(AMX_ROWS, in_features, generator=generator).to(torch.bfloat16)
    try:
        out = product(flat, packed, scales_and_zeros)
        alone = product(flat[3:4].contiguous(), packed, scales_and_zeros)
    except (RuntimeError, AttributeError) as error:
        return f"the {product.name} 4-bit product failed its self-check: {error}"
    expected = flat.double() @ weight.t()
    error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    if not error <= _CHECK_TOLERANCE:
        return f"the {product.name} 4-bit product is off by {error:.3g} of its largest output in its self-check"
    if not torch.equal(alone[0], out[3]):
        return f"the {product.name} 4-bit product rounds a row differently in a batch than alone"
    return None
