// The small operations between a Llama decoder layer's matrix products, for decode steps.
//
// Between its four products a layer of `LlamaDecodeStep` ran about 60 tensor operations per
// step: two RMS norms of 8 operations each, the rotary embedding of q and k (14), the cache
// write (8), splits, views and residual adds. Each costs a few microseconds of dispatch
// whatever the size, so for one row of SmolLM2-135M they took about a third of a step on a
// 2-core Xeon. Here they are four calls:
//
//   rms_norm(x, weight, eps)                      weight * (x * rsqrt(mean(x^2) + eps))
//   add_rms_norm(residual, x, weight, eps)        (residual + x, rms_norm(residual + x))
//   rope_cache(q, k, v, cos, sin, keys, values, position, groups)
//                                                 rotates q and k, writes k and v into the
//                                                 cache at `position`, returns q as
//                                                 (B, heads / groups, groups, D)
//   silu_mul(gate, up)                            silu(gate) * up
//
// Each rounds where PyTorch's operations round: to the tensor's dtype after every operation
// (bfloat16 values are computed in float32 and rounded to nearest even), and no product is
// fused into an addition (-ffp-contract=off). The norm's sums of squares and SiLU are
// PyTorch's own (at::sum, at::silu). So every result equals that of transformers' modules to
// the bit, and a greedy row decodes the same tokens on either path. A row's result does not
// depend on the other rows of the batch, except where PyTorch's own SiLU gives a row's last
// values of a float32 width that is not a multiple of its vector to a scalar loop.
//
// Inputs are (B, W) or (B, 1, W) with unit stride along W and any row stride, so the q, k
// and v of a fused product can be passed as views without copies.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

using c10::BFloat16;

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to the storage type: nothing for float, to nearest even for bfloat16 (as c10 does).
template <typename T>
inline T store(float x);
template <>
inline float store<float>(float x) { return x; }
template <>
inline BFloat16 store<BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  BFloat16 out;
  out.x = std::isnan(x) ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return out;
}

// Rounding a float to float is a no-op; this names the round trip through the storage type.
template <typename T>
inline float rounded(float x) { return to_float(store<T>(x)); }

// A (B, W) view of a (B, W) or (B, 1, W) tensor with unit stride along W.
struct Rows {
  int64_t rows, width, stride;
};

Rows rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 || (t.dim() == 3 && t.size(1) == 1), name, " must be (B, W) or (B, 1, W), got ",
              t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, name, " must have unit stride along its last dimension");
  return {t.size(0), t.size(-1), t.size(0) > 1 ? t.stride(0) : t.size(-1)};
}

void check_dtype(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(), ", got ",
              t.scalar_type());
}

at::Tensor new_rows(const at::Tensor& like, int64_t rows, int64_t width) {
  return like.dim() == 3 ? at::empty({rows, 1, width}, like.options()) : at::empty({rows, width}, like.options());
}

template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void square_row(const T* x, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = to_float(x[j]) * to_float(x[j]);
}

template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void scale_row(const T* x, const T* weight, T* out, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = store<T>(to_float(weight[j]) * rounded<T>(to_float(x[j]) * scale));
}

// transformers' LlamaRMSNorm: weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(dtype).
// at::sum adds the squares, as PyTorch's mean does, so the norm equals PyTorch's to the bit.
// It sums each row alone, whatever the batch.
template <typename T>
void norm_rows(const T* x, int64_t rows, int64_t stride, const T* weight, T* out, int64_t n, double eps) {
  at::Tensor squares = at::empty({rows, n}, at::TensorOptions().dtype(at::kFloat));
  float* square_data = squares.mutable_data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b) square_row<T>(x + b * stride, square_data + b * n, n);
  at::Tensor sums = at::sum(squares, {1});
  const float* sum_data = sums.const_data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b) {
    // mean is sum / n; the Python float eps is added in float32.
    float variance = sum_data[b] / static_cast<float>(n) + static_cast<float>(eps);
    scale_row<T>(x + b * stride, weight, out + b * n, n, 1.0f / std::sqrt(variance));
  }
}

template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void add_row(const T* a, const T* b, T* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = store<T>(to_float(a[j]) + to_float(b[j]));
}

template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void mul_row(const T* a, const T* b, T* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = store<T>(to_float(a[j]) * to_float(b[j]));
}

// transformers' q * cos + rotate_half(q) * sin, rounded after each operation. rotate_half
// puts -x[half:] before x[:half].
template <typename T>
inline __attribute__((always_inline)) void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; ++j)
    out[j] = store<T>(rounded<T>(to_float(x[j]) * to_float(cos[j])) +
                      rounded<T>(-to_float(x[j + half]) * to_float(sin[j])));
  for (int64_t j = half; j < dim; ++j)
    out[j] = store<T>(rounded<T>(to_float(x[j]) * to_float(cos[j])) +
                      rounded<T>(to_float(x[j - half]) * to_float(sin[j])));
}

// One row's q heads rotated into `q_out`, and its k heads rotated and v heads copied into the
// cache (head strides `key_stride` and `value_stride`). One call per row rather than per head.
template <typename T>
#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void rope_row(const T* q, const T* k, const T* v, const T* cos, const T* sin, int64_t heads, int64_t kv_heads,
              int64_t dim, T* q_out, T* key_out, int64_t key_stride, T* value_out, int64_t value_stride) {
  for (int64_t h = 0; h < heads; ++h) rotate<T>(q + h * dim, cos, sin, q_out + h * dim, dim);
  for (int64_t h = 0; h < kv_heads; ++h) {
    rotate<T>(k + h * dim, cos, sin, key_out + h * key_stride, dim);
    std::memcpy(value_out + h * value_stride, v + h * dim, dim * sizeof(T));
  }
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const Rows& shape) {
  check_dtype(weight, x, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == shape.width && weight.stride(0) == 1, "weight must be (",
              shape.width, ",) and contiguous, got ", weight.sizes());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const Rows shape = rows_of(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  at::Tensor out = new_rows(x, shape.rows, shape.width);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    check_norm(x, weight, shape);
    norm_rows<T>(x.const_data_ptr<T>(), shape.rows, shape.stride, weight.const_data_ptr<T>(),
                 out.mutable_data_ptr<T>(), shape.width, eps);
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(BFloat16{});
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& residual, const at::Tensor& x,
                                                const at::Tensor& weight, double eps) {
  const Rows shape = rows_of(residual, "residual");
  const Rows other = rows_of(x, "x");
  TORCH_CHECK(residual.scalar_type() == at::kFloat || residual.scalar_type() == at::kBFloat16,
              "residual must be float32 or bfloat16, got ", residual.scalar_type());
  check_dtype(x, residual, "x");
  TORCH_CHECK(other.rows == shape.rows && other.width == shape.width, "x must match residual's shape ",
              residual.sizes(), ", got ", x.sizes());
  at::Tensor sum = new_rows(residual, shape.rows, shape.width);
  at::Tensor out = new_rows(residual, shape.rows, shape.width);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    check_norm(residual, weight, shape);
    T* sum_data = sum.mutable_data_ptr<T>();
    for (int64_t b = 0; b < shape.rows; ++b)
      add_row<T>(residual.const_data_ptr<T>() + b * shape.stride, x.const_data_ptr<T>() + b * other.stride,
                 sum_data + b * shape.width, shape.width);
    norm_rows<T>(sum_data, shape.rows, shape.width, weight.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                 shape.width, eps);
  };
  if (residual.scalar_type() == at::kFloat) run(float{}); else run(BFloat16{});
  return {sum, out};
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  const Rows shape = rows_of(gate, "gate");
  const Rows other = rows_of(up, "up");
  TORCH_CHECK(gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16,
              "gate must be float32 or bfloat16, got ", gate.scalar_type());
  check_dtype(up, gate, "up");
  TORCH_CHECK(other.rows == shape.rows && other.width == shape.width, "up must match gate's shape ", gate.sizes(),
              ", got ", up.sizes());
  // PyTorch's own SiLU (its vectorized exp), so that the result equals silu(gate) * up to the bit.
  at::Tensor out = at::silu(gate).contiguous().view({shape.rows, shape.width});
  if (gate.dim() == 3) out = out.view({shape.rows, 1, shape.width});
  auto run = [&](auto tag) {
    using T = decltype(tag);
    T* data = out.mutable_data_ptr<T>();
    for (int64_t b = 0; b < shape.rows; ++b)
      mul_row<T>(data + b * shape.width, up.const_data_ptr<T>() + b * other.stride, data + b * shape.width,
                 shape.width);
  };
  if (gate.scalar_type() == at::kFloat) run(float{}); else run(BFloat16{});
  return out;
}

// Checks that `cache` is a (B, kv_heads, capacity, D) buffer with room at `position`.
void check_cache(const at::Tensor& cache, const at::Tensor& like, int64_t rows, int64_t kv_heads, int64_t dim,
                 int64_t position, const char* name) {
  check_dtype(cache, like, name);
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == rows && cache.size(1) == kv_heads && cache.size(3) == dim,
              name, " must be (", rows, ", ", kv_heads, ", positions, ", dim, "), got ", cache.sizes());
  TORCH_CHECK(cache.stride(3) == 1, name, " must have unit stride along its last dimension");
  TORCH_CHECK(0 <= position && position < cache.size(2), "position ", position, " is outside the ", cache.size(2),
              " positions of ", name);
}

at::Tensor rope_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& keys, const at::Tensor& values, int64_t position,
                      int64_t groups) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16, got ", q.scalar_type());
  const Rows qs = rows_of(q, "q"), ks = rows_of(k, "k"), vs = rows_of(v, "v");
  const Rows cs = rows_of(cos, "cos"), ss = rows_of(sin, "sin");
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&cos, "cos"}, {&sin, "sin"}}) check_dtype(*t, q, name);
  const int64_t B = qs.rows, dim = cs.width;
  TORCH_CHECK(dim > 0 && dim % 2 == 0, "cos must have an even, positive head size, got ", dim);
  TORCH_CHECK(ks.rows == B && vs.rows == B && cs.rows == B && ss.rows == B && ss.width == dim,
              "q, k, v, cos and sin must have the same rows, and cos and sin the same width");
  TORCH_CHECK(ks.width == vs.width && ks.width % dim == 0 && qs.width % dim == 0,
              "k and v must have the same width, and q's and k's widths must be multiples of the head size ", dim,
              " (the width of cos)");
  TORCH_CHECK(keys.dim() == 4 && keys.size(3) == dim, "keys must have the head size ", dim,
              " of cos in their last dimension, got ", keys.sizes());
  const int64_t heads = qs.width / dim, kv_heads = ks.width / dim;
  TORCH_CHECK(groups >= 1 && heads == kv_heads * groups, "q's ", heads, " heads must be groups (", groups,
              ") times k's ", kv_heads);
  check_cache(keys, q, B, kv_heads, dim, position, "keys");
  check_cache(values, q, B, kv_heads, dim, position, "values");
  at::Tensor out = at::empty({B, kv_heads, groups, dim}, q.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    for (int64_t b = 0; b < B; ++b) {
      rope_row<T>(q.const_data_ptr<T>() + b * qs.stride, k.const_data_ptr<T>() + b * ks.stride,
                  v.const_data_ptr<T>() + b * vs.stride, cos.const_data_ptr<T>() + b * cs.stride,
                  sin.const_data_ptr<T>() + b * ss.stride, heads, kv_heads, dim,
                  out.mutable_data_ptr<T>() + b * heads * dim,
                  keys.mutable_data_ptr<T>() + b * keys.stride(0) + position * keys.stride(2), keys.stride(1),
                  values.mutable_data_ptr<T>() + b * values.stride(0) + position * values.stride(2),
                  values.stride(1));
    }
  };
  if (q.scalar_type() == at::kFloat) run(float{}); else run(BFloat16{});
  return out;
}

}  // namespace

TORCH_LIBRARY(senab_layer, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor residual, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
        "int position, int groups) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(senab_layer, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_cache", &rope_cache);
  m.impl("silu_mul", &silu_mul);
}
