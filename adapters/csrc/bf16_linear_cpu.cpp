// A float32 input times a bfloat16 weight, for CPUs without AVX512-BF16, where torch's bfloat16 matmul is
// no faster than its float32 one: the output head's greedy screen (server/model/lm_head.py) on a 2-core Ice
// Lake Xeon took 20 ms for 16 rows against 22 ms in float32 (docs/decode-profile.md). Each weight element is
// widened exactly (bfloat16 is float32's upper half) and multiplied in float32 through the tile driver
// (tile_linear_cpu.h: fixed-order fused sums, the same bits on every variant and batch).
//
// Layout (`bf16_tiles` in lm_head.py): values [n / 16, k, 16] bfloat16, (t, c, j) = W[16t + j, c].

#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "tile_linear_cpu.h"

namespace {

using loraplex::tiles::kRows;
using loraplex::tiles::Rows;

struct Bf16Weight {
  const uint16_t* values;   // [tiles, k, 16]
  int64_t k;
};

// N adjacent tiles (1 or 2): each input element is broadcast once and multiplied into all N.
template <int N, int T>
__attribute__((target("avx512f"))) void tile_avx512(const Bf16Weight& w, int64_t tile, const Rows& r) {
  __m512 acc[N][T];
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < T; ++i) acc[n][i] = _mm512_setzero_ps();
  const uint16_t* values = w.values + tile * w.k * kRows;
  for (int64_t c = 0; c < w.k; ++c) {
    __m512 v[N];
    for (int n = 0; n < N; ++n) {
      const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + (n * w.k + c) * kRows));
      v[n] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i) {
      const __m512 xi = _mm512_set1_ps(r.x[c * T + i]);
      for (int n = 0; n < N; ++n) acc[n][i] = _mm512_fmadd_ps(xi, v[n], acc[n][i]);
    }
  }
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < T; ++i) _mm512_storeu_ps(r.out + i * r.ldo + (tile + n) * kRows, acc[n][i]);
}

template <int T>
__attribute__((target("avx2,fma"))) void tile_avx2(const Bf16Weight& w, int64_t tile, const Rows& r) {
  const uint16_t* values = w.values + tile * w.k * kRows;
  for (int64_t part = 0; part < kRows; part += 8) {
    __m256 acc[T];
    for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < w.k; ++c) {
      const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + c * kRows + part));
      const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
#pragma GCC unroll 8
      for (int i = 0; i < T; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(r.x[c * T + i]), v, acc[i]);
    }
    for (int i = 0; i < T; ++i) _mm256_storeu_ps(r.out + i * r.ldo + tile * kRows + part, acc[i]);
  }
}

template <int T>
void tile_scalar(const Bf16Weight& w, int64_t tile, const Rows& r) {
  const uint16_t* values = w.values + tile * w.k * kRows;
  for (int i = 0; i < T; ++i)
    for (int64_t j = 0; j < kRows; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < w.k; ++c) {
        const uint32_t bits = static_cast<uint32_t>(values[c * kRows + j]) << 16;
        float v;
        std::memcpy(&v, &bits, sizeof v);
        acc = std::fma(r.x[c * T + i], v, acc);
      }
      r.out[i * r.ldo + tile * kRows + j] = acc;
    }
}

struct Bf16 {
  using Weight = Bf16Weight;
  static constexpr int kAvx512Rows = 14, kAvx2Rows = 8, kScalarRows = 4;
  template <int N, int T> struct Avx512 { static void run(const Weight& w, int64_t t, const Rows& r) { tile_avx512<N, T>(w, t, r); } };
  template <int T> struct Avx2 { static void run(const Weight& w, int64_t t, const Rows& r) { tile_avx2<T>(w, t, r); } };
  template <int T> struct Scalar { static void run(const Weight& w, int64_t t, const Rows& r) { tile_scalar<T>(w, t, r); } };
};

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& values, int64_t isa) {
  loraplex::tiles::check_input(x);
  TORCH_CHECK(values.dim() == 3 && values.scalar_type() == at::kBFloat16 && values.size(2) == kRows &&
                  values.is_contiguous(), "values [n / 16, k, 16] bfloat16, contiguous");
  TORCH_CHECK(values.size(1) == x.size(1), "x has ", x.size(1), " columns, the weight ", values.size(1));
  const Bf16Weight w{reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), x.size(1)};
  return loraplex::tiles::run(x, w, values.size(0), loraplex::tiles::pick<Bf16>(isa, "bf16_linear"));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("bf16_linear(Tensor x, Tensor values, int isa=0) -> Tensor", &bf16_linear);
}
