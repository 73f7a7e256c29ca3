"""A 4-bit matrix product on AMX tiles, for decode steps of several rows.

PyTorch's 4-bit CPU kernel unpacks the weights again for every 4 rows, and the packed
bfloat16 copies that serve larger batches read 2 bytes per weight. We timed the 210 layers
of SmolLM2-135M on a 2-core Xeon with AMX and a 300 MB L3. The kernel took 4.5 ms for one
row but 27 ms for 16, the copies 13 to 15 ms at any row count. `senab/csrc/int4_amx.cpp`
unpacks each weight once per call into bfloat16 in L1 and multiplies up to 16 rows on AMX
tiles: 6.4 to 8.8 ms for 1 to 16 rows in the same run. It reads the 4-bit layers' own
codes, scales and zeros, so it adds no memory.

`senab.native` compiles it at the first use. A self-check against a float64 product then
decides whether it serves. Where the CPU lacks AMX or AVX-512 BF16, no compiler works, or
`SENAB_NATIVE_KERNELS=0`, it is not used and `amx_kernel_blocker` returns the reason.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from senab import native
from senab.packed import cpu_flags

SOURCE = "int4_amx.cpp"
# Decode steps of this many rows run on the AMX product where it is built; fewer rows stay on
# PyTorch's kernel. We timed steps of SmolLM2-135M with the bridge on a 2-core Xeon with a
# 300 MB L3, without and with the AMX product (the copies served above 8 rows without it).
# They took 13.9 and 16.6 ms for 2 rows, 17.7 and 18.4 for 4, 24.0 and 18.8 for 8, and 30.3
# and 24.3 for 16.
# NOTE: measured on that machine kind only. A CPU whose L3 does not hold the 4-bit weights may
# favour another threshold.
MIN_ROWS = 5
MAX_ROWS = 16  # rows of an AMX tile
BLOCK = 64  # outputs per block of PyTorch's 4-bit layout with AVX-512
FLAGS = (*native.COMMON_FLAGS, "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
         "-mamx-tile", "-mamx-bf16")
REQUIRED_CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl", "avx512dq")
# The self-check's largest error allowed, relative to the largest output: each weight and
# each output is rounded to bfloat16 (8 significant bits), so a few 2^-8 at most.
_CHECK_TOLERANCE = 2e-2


def amx_kernel_blocker() -> str | None:
    """Return why the AMX product cannot serve in this process, or None when it can (builds it on first use)."""
    return _load()


def build() -> Path:
    """Compile the operator unless it is cached, and return the library (for images built ahead)."""
    return native.build(SOURCE, FLAGS)


def int4_mm(flat: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Return the (rows, N) bfloat16 product of contiguous bfloat16 (rows, K) `flat` with 4-bit weights.

    `packed` and `scales_and_zeros` are an `Int4Linear`'s buffers; rows 1 to `MAX_ROWS`.
    Call `amx_kernel_blocker` first: the operator exists only after it returned None.
    """
    return torch.ops.senab.int4_mm(flat, packed, scales_and_zeros)


@functools.cache
def _load() -> str | None:
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    from senab.quant import packed_block  # here, because senab.quant imports this module

    block = packed_block()
    if block != BLOCK:
        return f"this torch packs 4-bit weights in blocks of {block} outputs, not {BLOCK}"
    return native.load(SOURCE, FLAGS, "senab::int4_mm") or _self_check()


def _self_check() -> str | None:
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
    weight = ((codes.float() - 8) * group_scales + group_zeros).to(torch.bfloat16).double()
    flat = torch.randn(MAX_ROWS, in_features, generator=generator).to(torch.bfloat16)
    try:
        out = int4_mm(flat, packed, scales_and_zeros)
        alone = int4_mm(flat[3:4].contiguous(), packed, scales_and_zeros)
    except (RuntimeError, AttributeError) as error:
        return f"the AMX 4-bit product failed its self-check: {error}"
    expected = flat.double() @ weight.t()
    error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    if not error <= _CHECK_TOLERANCE:
        return f"the AMX 4-bit product is off by {error:.3g} of its largest output in its self-check"
    if not torch.equal(alone[0], out[3]):
        return "the AMX 4-bit product rounds a row differently in a batch than alone"
    return None
