// The 4-bit layout that int4_amx.cpp and int4_avx512.cpp read: PyTorch's for its 4-bit CPU
// kernel with AVX-512 (`_convert_weight_to_int4pack_for_cpu`). Codes come in blocks of 64
// outputs, with 32 bytes per input whose low nibbles are the block's first 32 outputs and
// high nibbles the other 32. Scales and zeros are bfloat16 (K / 32, N, 2), and a weight is
// (q - 8) * scale + zero.
//
// Include it after <immintrin.h> in a file built with AVX-512 flags.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace senab_int4 {

constexpr int64_t kBlock = 64;  // outputs per block of the packed layout
constexpr int64_t kGroup = 32;  // inputs per scale and zero

// Raises a c10::Error naming the value and the fix where the arguments do not fit the layout.
// `max_rows` 0 means any number of rows.
inline void check_arguments(const char* op, const at::Tensor& input, const at::Tensor& packed,
                            const at::Tensor& scales_and_zeros, int64_t max_rows) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kBFloat16 && input.is_contiguous(), op,
              ": invalid input of shape ", input.sizes(), " and dtype ", input.scalar_type(),
              "; pass a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(scales_and_zeros.dim() == 3 && scales_and_zeros.size(2) == 2 &&
                  scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous(),
              op, ": invalid scales_and_zeros of shape ", scales_and_zeros.sizes(), " and dtype ",
              scales_and_zeros.scalar_type(), "; pass contiguous bfloat16 (K / 32, N, 2)");
  const int64_t M = input.size(0), K = input.size(1), N = scales_and_zeros.size(1);
  if (max_rows > 0) {
    TORCH_CHECK(M >= 1 && M <= max_rows, op, ": invalid ", M, " rows; pass 1 to ", max_rows);
  } else {
    TORCH_CHECK(M >= 1, op, ": invalid input of 0 rows; pass at least one");
  }
  TORCH_CHECK(K % kGroup == 0 && scales_and_zeros.size(0) == K / kGroup, op, ": input size ", K,
              " does not match scales for ", scales_and_zeros.size(0) * kGroup);
  TORCH_CHECK(N % kBlock == 0, op, ": invalid output size ", N, "; it must be a multiple of ", kBlock);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), op, ": invalid packed weights of dtype ",
              packed.scalar_type(), "; pass the contiguous uint8 buffer of an Int4Linear");
  TORCH_CHECK(packed.numel() == N * K / 2, op, ": packed weights of ", packed.numel(), " bytes do not hold ", N,
              " x ", K, " codes");
}

// Loads the scales of 16 consecutive outputs from their (scale, zero) bfloat16 pairs, and
// offset = zero - code_offset * scale, in float32.
inline void load_scales(const uint32_t* pairs, float code_offset, __m512& scale, __m512& offset) {
  const __m512i both = _mm512_loadu_si512(pairs);
  scale = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
  const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(both, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  offset = _mm512_fnmadd_ps(_mm512_set1_ps(code_offset), scale, zero);
}

}  // namespace senab_int4
