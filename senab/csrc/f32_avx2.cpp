// A float32 matrix product on AVX2 with FMA, for linear layers of few rows (decode steps)
// and of many (prompts).
//
// The weight (N, K) is stored in panels of 16 outputs: panels[p][k][j] = weight[16p + j][k],
// so a panel is read front to back, 64 bytes per input. For each panel, passes of up to 6
// rows keep 6 x 2 accumulators of 8 outputs in registers and add x[r][k] * w[k] for k from
// 0 to K - 1. A long K is walked in chunks; between chunks the accumulators wait in memory
// as float32, which changes nothing in their values. So every output is the same chain of
// fused multiply-adds, in the same order, whatever the number of rows in the call, the
// pass, tile or thread that computes it: a row's output does not depend on its batch.
//
// Rows come in tiles whose inputs fit in L2 (192 KB), so that a prompt's inputs are not
// read again from memory for every panel.
//
// Built by senab/packed.py with -mavx2 -mfma; call it only where the CPU has both.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kPanel = 16;       // outputs per panel: two vectors of 8 floats
constexpr int64_t kPassRows = 6;     // 6 x 2 accumulators, 2 weight vectors and a broadcast: 15 of 16 registers
constexpr int64_t kChunk = 256;      // inputs per chunk: 16 KB of a panel, which stays in L1 across passes
constexpr int64_t kTileBytes = 192 * 1024;
constexpr int64_t kMaxTileRows = 240;  // bounds the accumulators kept between chunks (15 KB per thread)

// Adds x[r][k] * w[k] for k in [k0, k1) to rows 0..R-1 of `sums` (16 floats per row), or
// starts from zero when `first`.
template <int R>
void pass(const float* x, int64_t K, const float* panel, int64_t k0, int64_t k1, float* sums, bool first) {
  // Named accumulators rather than an array: GCC 12 kept an array's elements on the stack
  // and stored them at every step.
  __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
  a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = _mm256_setzero_ps();
#define SENAB_LOAD(r)                                    \
  if constexpr (R > r) {                                 \
    if (!first) {                                        \
      a##r##0 = _mm256_load_ps(sums + (r) * kPanel);     \
      a##r##1 = _mm256_load_ps(sums + (r) * kPanel + 8); \
    }                                                    \
  }
  SENAB_LOAD(0) SENAB_LOAD(1) SENAB_LOAD(2) SENAB_LOAD(3) SENAB_LOAD(4) SENAB_LOAD(5)
#undef SENAB_LOAD
  const float* xk = x + k0;
  const float* wk = panel + k0 * kPanel;
  for (int64_t k = k0; k < k1; ++k, ++xk, wk += kPanel) {
    const __m256 w0 = _mm256_load_ps(wk);
    const __m256 w1 = _mm256_load_ps(wk + 8);
#define SENAB_FMA(r)                                          \
  if constexpr (R > r) {                                      \
    const __m256 xb = _mm256_broadcast_ss(xk + (r) * K);      \
    a##r##0 = _mm256_fmadd_ps(xb, w0, a##r##0);               \
    a##r##1 = _mm256_fmadd_ps(xb, w1, a##r##1);               \
  }
    SENAB_FMA(0) SENAB_FMA(1) SENAB_FMA(2) SENAB_FMA(3) SENAB_FMA(4) SENAB_FMA(5)
#undef SENAB_FMA
  }
#define SENAB_STORE(r)                                  \
  if constexpr (R > r) {                                \
    _mm256_store_ps(sums + (r) * kPanel, a##r##0);      \
    _mm256_store_ps(sums + (r) * kPanel + 8, a##r##1);  \
  }
  SENAB_STORE(0) SENAB_STORE(1) SENAB_STORE(2) SENAB_STORE(3) SENAB_STORE(4) SENAB_STORE(5)
#undef SENAB_STORE
}

using Pass = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, bool);
constexpr Pass kPasses[kPassRows + 1] = {nullptr, pass<1>, pass<2>, pass<3>, pass<4>, pass<5>, pass<6>};

at::Tensor f32_mm(const at::Tensor& input, const at::Tensor& panels, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat && input.is_contiguous(),
              "f32_mm: input must be a contiguous 2-D float32 tensor, got ", input.sizes(), " ",
              input.scalar_type());
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.scalar_type() == at::kFloat &&
                  panels.is_contiguous(),
              "f32_mm: panels must be a contiguous float32 tensor of shape (N / 16, K, 16), got ", panels.sizes(),
              " ", panels.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(panels.const_data_ptr()) % 32 == 0,
              "f32_mm: panels must start on a 32-byte boundary; pass a tensor of its own, not a view");
  TORCH_CHECK(input.size(1) == panels.size(1), "f32_mm: input has ", input.size(1), " columns but the panels ",
              panels.size(1), " inputs");
  const int64_t M = input.size(0), K = input.size(1), N = panels.size(0) * kPanel;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous(),
                "f32_mm: bias must be a contiguous float32 vector of ", N, " values, got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  at::Tensor output = at::empty({M, N}, input.options());
  if (M == 0 || N == 0) return output;
  if (K == 0) return bias.has_value() ? output.copy_(bias->expand({M, N})) : output.zero_();
  const float* x = input.const_data_ptr<float>();
  const float* w = panels.const_data_ptr<float>();
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* y = output.mutable_data_ptr<float>();

  const int64_t tile = std::clamp<int64_t>(kTileBytes / (K * 4) / kPassRows * kPassRows, kPassRows, kMaxTileRows);
  for (int64_t tile0 = 0; tile0 < M; tile0 += tile) {
    const int64_t rows = std::min(tile, M - tile0);
    // The tile's rows split into passes of nearly equal size, at most kPassRows each.
    const int64_t passes = (rows + kPassRows - 1) / kPassRows;
    // Rows tile0 .. tile0 + rows - 1 times panel p, into the output.
    auto panel_product = [&](int64_t p, float* sums) {
      const float* panel = w + p * K * kPanel;
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        int64_t row0 = 0;
        for (int64_t i = 0; i < passes; ++i) {
          const int64_t n = rows / passes + (i < rows % passes ? 1 : 0);
          kPasses[n](x + (tile0 + row0) * K, K, panel, k0, k1, sums + row0 * kPanel, k0 == 0);
          row0 += n;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = y + (tile0 + r) * N + p * kPanel;
        for (int64_t half = 0; half < kPanel; half += 8) {
          __m256 v = _mm256_load_ps(sums + r * kPanel + half);
          if (b != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(b + p * kPanel + half));
          _mm256_storeu_ps(dst + half, v);
        }
      }
    };
    // Threads take panels from a shared counter rather than a fixed share each. When another
    // process or the server's event loop takes a core for a while, the other thread then
    // does more panels instead of waiting for it at the end of the call.
    std::atomic<int64_t> next_panel{0};
    const int64_t total = N / kPanel;
    const int64_t threads = at::get_num_threads();
    const int64_t grain = std::max<int64_t>(1, total / (8 * threads));
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      alignas(32) float sums[kMaxTileRows * kPanel];
      for (int64_t begin = next_panel.fetch_add(grain); begin < total; begin = next_panel.fetch_add(grain)) {
        for (int64_t p = begin; p < std::min(begin + grain, total); ++p) panel_product(p, sums);
      }
    });
  }
  return output;
}

}  // namespace

TORCH_LIBRARY(senab_avx2, m) {
  m.def("f32_mm(Tensor input, Tensor panels, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_avx2, CPU, m) {
  m.impl("f32_mm", &f32_mm);
}
