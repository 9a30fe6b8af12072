// A decoder layer's small float32 operations on a CPU, each one call: RMSNorm and rotary embeddings. In torch
// they are five to eight element-wise calls each, and at decode sizes every call costs ~10 us whatever its
// size: on a 2-core Ice Lake Xeon at batch 32 the two norms took 134 us a layer and rotary on q and k 168 us,
// ~9 ms of a 87 ms step (docs/decode-profile.md).
//
// Rotary gives torch's bits exactly (the same products and sums, none fused: the build is ISO C++). RMSNorm sums each row's squares
// in 16 lanes and then the lanes in a fixed order, so a row's result is its own whatever the batch; torch
// sums in an order of its own, so the two differ in the last bits of the scale.

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

constexpr int64_t kLanes = 16;

// x [n, k] float32 rows contiguous, weight [k]: weight * (x * rsqrt(mean(x^2) + eps)), row by row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x [n, k] float32, rows contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.size(0) == x.size(1), "weight [k] float32, one per column of x");
  const int64_t n = x.size(0), k = x.size(1), whole = k / kLanes * kLanes;
  auto out = at::empty({n, k}, x.options());
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict row = x.data_ptr<float>() + i * x.stride(0);
      float lanes[kLanes] = {};
      for (int64_t c = 0; c < whole; c += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += row[c + j] * row[c + j];
      float sum = 0.0f;
      for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
      for (int64_t c = whole; c < k; ++c) sum += row[c] * row[c];
      const float scale = 1.0f / std::sqrt(sum / static_cast<float>(k) + static_cast<float>(eps));
      float* __restrict o = out.data_ptr<float>() + i * k;
      for (int64_t c = 0; c < k; ++c) o[c] = w[c] * (row[c] * scale);
    }
  });
  return out;
}

// x [n, heads, d] float32 (the last dim contiguous, any other strides), cos and sin [n, d]: in place,
// x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x[d/2:], x[:d/2]), as torch computes it.
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x [n, heads, d] float32, d even and contiguous");
  for (const auto* table : {&cos, &sin})
    TORCH_CHECK(table->dim() == 2 && table->scalar_type() == at::kFloat && table->is_contiguous() &&
                    table->size(0) == x.size(0) && table->size(1) == x.size(2), "cos, sin [n, d] float32, contiguous");
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  float* base = x.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* __restrict c = cos.data_ptr<float>() + i * d;
    const float* __restrict s = sin.data_ptr<float>() + i * d;
    for (int64_t h = 0; h < heads; ++h) {
      float* __restrict low = base + i * x.stride(0) + h * x.stride(1);
      float* __restrict high = low + half;
      for (int64_t j = 0; j < half; ++j) {
        const float a = low[j], b = high[j];
        low[j] = a * c[j] + -b * s[j];
        high[j] = b * c[j + half] + a * s[j + half];
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rotary_);
}
