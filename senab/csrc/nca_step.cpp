// The automaton's steps for one new position per row: the bridge's work in a decode step.
//
// `NCACell._grow_one` runs the same arithmetic as about 70 small tensor operations: 160 us
// per decode step for one row on a 2-core Xeon, where a whole step takes about 10 ms. Here
// it is one call (31 us). It computes in float32 and sums in another order than PyTorch's
// matrix products, so results equal the Python path up to float rounding.
//
// Per step s and row b, with the window W = [the row's last w - 1 inputs of step s, x]:
//   mixed = bias + fused . W              (H + 1 values: the update's first layer, then the gate)
//   update = second_bias + second . silu(layer_norm(mixed[:H]))
//   x = lerp(x, update, sigmoid(mixed[H]))
// and the step's cache becomes the last w - 1 entries of W.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

struct Weights {
  const float* fused;          // (H + 1, w * C), row-major
  const float* bias;           // (H + 1)
  const float* norm_weight;    // (H)
  const float* norm_bias;      // (H)
  const float* second;         // (C, H), row-major
  const float* second_bias;    // (C)
  float eps;
  int64_t channels, hidden, width;
};

// torch.lerp's formula, which switches at weight 0.5 to keep the ends exact.
inline float lerp(float start, float end, float weight) {
  return weight < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

// Sixteen running sums, one per lane, so that the compiler vectorizes the products without
// reordering any single sum. The lanes are added at the end.
constexpr int64_t kLanes = 16;

inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void grow_row(const Weights& w, const float* const* cache_rows, float* const* new_cache_rows, const float* x_in,
              float* x_out, int64_t steps, float* scratch) {
  const int64_t C = w.channels, H = w.hidden, keep = w.width - 1, inputs = w.width * C;
  float* window = scratch;      // w * C
  float* mixed = window + inputs;  // H + 1
  float* x = mixed + H + 1;     // C
  for (int64_t c = 0; c < C; ++c) x[c] = x_in[c];
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t i = 0; i < keep * C; ++i) window[i] = cache_rows[s][i];
    for (int64_t c = 0; c < C; ++c) window[keep * C + c] = x[c];
    for (int64_t i = 0; i < keep * C; ++i) new_cache_rows[s][i] = window[C + i];
    for (int64_t h = 0; h <= H; ++h) mixed[h] = w.bias[h] + dot(w.fused + h * inputs, window, inputs);
    float mean = 0.0f;
    for (int64_t h = 0; h < H; ++h) mean += mixed[h];
    mean /= static_cast<float>(H);
    float variance = 0.0f;
    for (int64_t h = 0; h < H; ++h) variance += (mixed[h] - mean) * (mixed[h] - mean);
    variance /= static_cast<float>(H);
    const float inv = 1.0f / std::sqrt(variance + w.eps);
    for (int64_t h = 0; h < H; ++h) {
      const float normed = (mixed[h] - mean) * inv * w.norm_weight[h] + w.norm_bias[h];
      mixed[h] = normed / (1.0f + std::exp(-normed));  // SiLU
    }
    const float gate = 1.0f / (1.0f + std::exp(-mixed[H]));
    for (int64_t c = 0; c < C; ++c) x[c] = lerp(x[c], w.second_bias[c] + dot(w.second + c * H, mixed, H), gate);
  }
  for (int64_t c = 0; c < C; ++c) x_out[c] = x[c];
}

void check_shape(const at::Tensor& tensor, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.is_contiguous() && tensor.sizes() == shape,
              "senab::nca_grow_one: invalid ", name, " of shape ", tensor.sizes(), " and dtype ", tensor.scalar_type(),
              "; pass a contiguous float32 tensor of shape ", shape);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> nca_grow_one(
    const at::Tensor& x, at::TensorList cache, const at::Tensor& fused, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps, const at::Tensor& second,
    const at::Tensor& second_bias) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "senab::nca_grow_one: invalid x of shape ", x.sizes(),
              "; pass (rows, 1, channels)");
  TORCH_CHECK(!cache.empty(), "senab::nca_grow_one: no cache entries; pass one per step");
  TORCH_CHECK(cache[0].dim() == 3 && cache[0].size(1) >= 1, "senab::nca_grow_one: invalid cache entry of shape ",
              cache[0].sizes(), "; pass (rows, kernel width - 1, channels)");
  TORCH_CHECK(norm_weight.dim() == 1, "senab::nca_grow_one: invalid norm_weight of shape ", norm_weight.sizes(),
              "; pass (hidden)");
  const int64_t B = x.size(0), C = x.size(2), H = norm_weight.size(0), steps = static_cast<int64_t>(cache.size());
  const int64_t keep = cache[0].size(1), width = keep + 1;
  check_shape(x, "x", {B, 1, C});
  for (const auto& entry : cache) check_shape(entry, "cache entry", {B, keep, C});
  check_shape(fused, "fused", {H + 1, width * C});
  check_shape(bias, "bias", {H + 1});
  check_shape(norm_weight, "norm_weight", {H});
  check_shape(norm_bias, "norm_bias", {H});
  check_shape(second, "second", {C, H});
  check_shape(second_bias, "second_bias", {C});

  const Weights w{fused.const_data_ptr<float>(), bias.const_data_ptr<float>(), norm_weight.const_data_ptr<float>(),
                  norm_bias.const_data_ptr<float>(), second.const_data_ptr<float>(),
                  second_bias.const_data_ptr<float>(), static_cast<float>(eps), C, H, width};
  at::Tensor out = at::empty({B, 1, C}, x.options());
  std::vector<at::Tensor> new_cache;
  new_cache.reserve(steps);
  for (int64_t s = 0; s < steps; ++s) new_cache.push_back(at::empty({B, keep, C}, x.options()));
  const float* x_data = x.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  // Rows are independent, and fewer than 8 rows do not pay for a parallel region.
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(width * C + H + 1 + C);
    std::vector<const float*> cache_rows(steps);
    std::vector<float*> new_rows(steps);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t s = 0; s < steps; ++s) {
        cache_rows[s] = cache[s].const_data_ptr<float>() + b * keep * C;
        new_rows[s] = new_cache[s].mutable_data_ptr<float>() + b * keep * C;
      }
      grow_row(w, cache_rows.data(), new_rows.data(), x_data + b * C, out_data + b * C, steps, scratch.data());
    }
  });
  return {out, new_cache};
}

}  // namespace

TORCH_LIBRARY(senab_nca, m) {
  m.def("nca_grow_one(Tensor x, Tensor[] cache, Tensor fused, Tensor bias, Tensor norm_weight, Tensor norm_bias, "
        "float eps, Tensor second, Tensor second_bias) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(senab_nca, CPU, m) {
  m.impl("nca_grow_one", &nca_grow_one);
}
