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
//
// `bridge_step` is the bridge's whole work at a decode step in one call: the read-in, these
// steps, the write-out and the readout sums. In a decode step the model's weights stream
// through the caches and evict PyTorch's code and data, so each small operation costs 20 to
// 30 us there instead of a few. The 25 operations of the read-in hook took about 0.55 ms of
// an 11 ms one-row step of SmolLM2-135M (2-core Zen 4). This call takes about 0.16 ms there.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
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

void check_shape(const char* op, const at::Tensor& tensor, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.is_contiguous() && tensor.sizes() == shape, op,
              ": invalid ", name, " of shape ", tensor.sizes(), " and dtype ", tensor.scalar_type(),
              "; pass a contiguous float32 tensor of shape ", shape);
}

// Checks the automaton's cache of B rows of C channels and its weights, and returns the weights.
Weights automaton_weights(const char* op, at::TensorList cache, int64_t B, int64_t C, const at::Tensor& fused,
                          const at::Tensor& bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                          double eps, const at::Tensor& second, const at::Tensor& second_bias) {
  TORCH_CHECK(!cache.empty(), op, ": no cache entries; pass one per step");
  TORCH_CHECK(cache[0].dim() == 3 && cache[0].size(1) >= 1, op, ": invalid cache entry of shape ", cache[0].sizes(),
              "; pass (rows, kernel width - 1, channels)");
  TORCH_CHECK(norm_weight.dim() == 1, op, ": invalid norm_weight of shape ", norm_weight.sizes(), "; pass (hidden)");
  const int64_t H = norm_weight.size(0), keep = cache[0].size(1), width = keep + 1;
  for (const auto& entry : cache) check_shape(op, entry, "cache entry", {B, keep, C});
  check_shape(op, fused, "fused", {H + 1, width * C});
  check_shape(op, bias, "bias", {H + 1});
  check_shape(op, norm_weight, "norm_weight", {H});
  check_shape(op, norm_bias, "norm_bias", {H});
  check_shape(op, second, "second", {C, H});
  check_shape(op, second_bias, "second_bias", {C});
  return Weights{fused.const_data_ptr<float>(), bias.const_data_ptr<float>(), norm_weight.const_data_ptr<float>(),
                 norm_bias.const_data_ptr<float>(), second.const_data_ptr<float>(),
                 second_bias.const_data_ptr<float>(), static_cast<float>(eps), C, H, width};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> nca_grow_one(
    const at::Tensor& x, at::TensorList cache, const at::Tensor& fused, const at::Tensor& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps, const at::Tensor& second,
    const at::Tensor& second_bias) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "senab::nca_grow_one: invalid x of shape ", x.sizes(),
              "; pass (rows, 1, channels)");
  const int64_t B = x.size(0), C = x.size(2), steps = static_cast<int64_t>(cache.size());
  check_shape("senab::nca_grow_one", x, "x", {B, 1, C});
  const Weights w = automaton_weights("senab::nca_grow_one", cache, B, C, fused, bias, norm_weight, norm_bias, eps,
                                      second, second_bias);
  const int64_t keep = w.width - 1, width = w.width, H = w.hidden;
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

// Returns the deltas; updates `cache` (each step's window, in place), `positions` and the readout sums.
at::Tensor bridge_step(
    const at::Tensor& hidden, const at::Tensor& sessions, const at::Tensor& read_in, double rms_eps,
    at::TensorList cache, const at::Tensor& fused, const at::Tensor& bias, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, double eps, const at::Tensor& second, const at::Tensor& second_bias,
    const at::Tensor& write_weight, const at::Tensor& write_bias, const at::Tensor& gains, const at::Tensor& enabled,
    double strength, at::Tensor& positions, const at::Tensor& turn_starts, at::Tensor& readout_sum,
    at::Tensor& readout_count) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1 && hidden.is_contiguous() &&
                  (hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16),
              "senab::bridge_step: invalid hidden of shape ", hidden.sizes(), " and dtype ", hidden.scalar_type(),
              "; pass contiguous float32 or bfloat16 (rows, 1, hidden size)");
  TORCH_CHECK(gains.dim() == 2, "senab::bridge_step: invalid gains of shape ", gains.sizes(),
              "; pass (bridged layers, 2 * K/V width)");
  const int64_t B = hidden.size(0), D = hidden.size(2), C = sessions.size(-1);
  const Weights w = automaton_weights("senab::bridge_step", cache, B, C, fused, bias, norm_weight, norm_bias, eps,
                                      second, second_bias);
  const int64_t steps = static_cast<int64_t>(cache.size()), keep = w.width - 1, width = w.width, H = w.hidden;
  const int64_t layers = gains.size(0), out_width = gains.size(1);
  check_shape("senab::bridge_step", sessions, "sessions", {B, C});
  check_shape("senab::bridge_step", read_in, "read_in", {C, D});
  check_shape("senab::bridge_step", write_weight, "write_weight", {out_width, C});
  check_shape("senab::bridge_step", write_bias, "write_bias", {out_width});
  check_shape("senab::bridge_step", gains, "gains", {layers, out_width});
  check_shape("senab::bridge_step", readout_sum, "readout_sum", {B, C});
  check_shape("senab::bridge_step", readout_count, "readout_count", {B});
  TORCH_CHECK(enabled.scalar_type() == at::kBool && enabled.is_contiguous() && enabled.numel() == B,
              "senab::bridge_step: invalid enabled; pass a contiguous bool tensor of ", B, " rows");
  for (const at::Tensor* counter : std::initializer_list<const at::Tensor*>{&positions, &turn_starts})
    TORCH_CHECK(counter->scalar_type() == at::kLong && counter->is_contiguous() && counter->numel() == B,
                "senab::bridge_step: invalid positions or turn_starts; pass contiguous int64 tensors of ", B, " rows");

  at::Tensor deltas = at::empty({layers, B, 1, out_width}, hidden.options());
  const bool bfloat16 = hidden.scalar_type() == at::kBFloat16;
  const float gain_strength = static_cast<float>(strength);

  // Raw pointers, taken once: the accessors check the dtype at every call.
  const auto* hidden_bf16 = bfloat16 ? hidden.const_data_ptr<c10::BFloat16>() : nullptr;
  const float* hidden_f32 = bfloat16 ? nullptr : hidden.const_data_ptr<float>();
  const float* session_data = sessions.const_data_ptr<float>();
  const float* read_in_data = read_in.const_data_ptr<float>();
  const float* write_data = write_weight.const_data_ptr<float>();
  const float* write_bias_data = write_bias.const_data_ptr<float>();
  const float* gain_data = gains.const_data_ptr<float>();
  const bool* enabled_data = enabled.const_data_ptr<bool>();
  int64_t* position_data = positions.mutable_data_ptr<int64_t>();
  const int64_t* turn_start_data = turn_starts.const_data_ptr<int64_t>();
  float* sum_data = readout_sum.mutable_data_ptr<float>();
  float* count_data = readout_count.mutable_data_ptr<float>();
  auto* deltas_bf16 = bfloat16 ? deltas.mutable_data_ptr<c10::BFloat16>() : nullptr;
  float* deltas_f32 = bfloat16 ? nullptr : deltas.mutable_data_ptr<float>();
  // Each step's window is copied out before the step writes its new cache, so the cache is
  // updated in place, without an allocation per step.
  std::vector<float*> cache_data(steps);
  for (int64_t s = 0; s < steps; ++s) cache_data[s] = const_cast<float*>(cache[s].const_data_ptr<float>());

  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(width * C + H + 1 + C);
    std::vector<float> normed(D), seed(C), lattice(C), delta(out_width);
    std::vector<const float*> cache_rows(steps);
    std::vector<float*> new_rows(steps);
    for (int64_t b = begin; b < end; ++b) {
      // Read-in: x0 = s + W_in . rmsnorm(h), the norm in float32 without a weight.
      for (int64_t i = 0; i < D; ++i)
        normed[i] = bfloat16 ? static_cast<float>(hidden_bf16[b * D + i]) : hidden_f32[b * D + i];
      const float mean_square = dot(normed.data(), normed.data(), D) / static_cast<float>(D);
      const float inverse = 1.0f / std::sqrt(mean_square + static_cast<float>(rms_eps));
      for (int64_t i = 0; i < D; ++i) normed[i] *= inverse;
      for (int64_t c = 0; c < C; ++c) seed[c] = session_data[b * C + c] + dot(read_in_data + c * D, normed.data(), D);
      for (int64_t s = 0; s < steps; ++s) {
        cache_rows[s] = cache_data[s] + b * keep * C;
        new_rows[s] = cache_data[s] + b * keep * C;
      }
      grow_row(w, cache_rows.data(), new_rows.data(), seed.data(), lattice.data(), steps, scratch.data());

      // Write-out, as Bridge.gained_deltas rounds it: (gain * row) * (strength * tanh(.)).
      const float row = enabled_data[b] ? 1.0f : 0.0f;
      for (int64_t j = 0; j < out_width; ++j)
        delta[j] = gain_strength * std::tanh(write_bias_data[j] + dot(write_data + j * C, lattice.data(), C));
      for (int64_t l = 0; l < layers; ++l) {
        const float* gain = gain_data + l * out_width;
        const int64_t start = (l * B + b) * out_width;
        for (int64_t j = 0; j < out_width; ++j) {
          const float value = (gain[j] * row) * delta[j];
          if (bfloat16) deltas_bf16[start + j] = c10::BFloat16(value);  // to nearest even, as PyTorch rounds
          else deltas_f32[start + j] = value;
        }
      }

      // Readout: the lattice of positions at or after the turn start.
      const float weight = position_data[b] >= turn_start_data[b] ? 1.0f : 0.0f;
      position_data[b] += 1;
      for (int64_t c = 0; c < C; ++c) sum_data[b * C + c] += lattice[c] * weight;
      count_data[b] += weight;
    }
  });
  return deltas;
}

}  // namespace

TORCH_LIBRARY(senab_nca, m) {
  m.def("nca_grow_one(Tensor x, Tensor[] cache, Tensor fused, Tensor bias, Tensor norm_weight, Tensor norm_bias, "
        "float eps, Tensor second, Tensor second_bias) -> (Tensor, Tensor[])");
  m.def("bridge_step(Tensor hidden, Tensor sessions, Tensor read_in, float rms_eps, Tensor(d!)[] cache, Tensor fused, "
        "Tensor bias, Tensor norm_weight, Tensor norm_bias, float eps, Tensor second, Tensor second_bias, "
        "Tensor write_weight, Tensor write_bias, Tensor gains, Tensor enabled, float strength, "
        "Tensor(a!) positions, Tensor turn_starts, Tensor(b!) readout_sum, Tensor(c!) readout_count) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_nca, CPU, m) {
  m.impl("nca_grow_one", &nca_grow_one);
  m.impl("bridge_step", &bridge_step);
}
