// NF4 linear for CPUs that bitsandbytes' fused kernel does not run on (it needs AVX512-BF16): without it,
// every `Linear4bit` call dequantizes its whole weight into a float32 copy and then multiplies, which on a
// 2-core Ice Lake Xeon made the 4-bit matmuls ~80% of a decode step (docs/decode-profile.md).
//
// out[i, r] = sum_c x[i, c] * (code[q(r, c)] * absmax(r, c)), the weight being exactly bitsandbytes'
// dequantized float32 weight (one float32 product per element), through the tile driver
// (tile_linear_cpu.h: fixed-order fused sums, the same bits on every variant and batch). Only the order of
// the sums differs from dequantize + sgemm (BLAS sums in an order of its own).
//
// Layout (`nf4_layout` in server/model/nf4_native.py builds it once at load), 16 output rows per tile:
//   codes  [n / 16, k / 2, 16] uint8: byte (t, p, j) = q(16t + j, 2p) | q(16t + j, 2p + 1) << 4
//   scales [n / 16, k / bs, 16] float32: absmax of row 16t + j in block b of bs columns
// so one 16-byte load gives two columns of a tile's 16 rows, and a 16-entry table lookup (vpermps) their
// values. Inputs are broadcast one element at a time: no horizontal sums anywhere.

#include <torch/library.h>

#include <immintrin.h>

#include <cmath>

#include "tile_linear_cpu.h"

namespace {

using loraplex::tiles::kRows;
using loraplex::tiles::Rows;

struct Nf4Weight {
  const uint8_t* codes;   // [tiles, k / 2, 16]
  const float* scales;    // [tiles, k / bs, 16]
  const float* table;     // [16] the code book
  int64_t k, bs;
};

// ---- AVX-512: a tile's 16 rows in one register per input row; N adjacent tiles (1 or 2) share each
// input element's broadcast ---------------------------------------------------------------------------------
template <int N, int T>
__attribute__((target("avx512f"))) void tile_avx512(const Nf4Weight& w, int64_t tile, const Rows& r) {
  __m512 acc[N][T];
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < T; ++i) acc[n][i] = _mm512_setzero_ps();
  const __m512 table = _mm512_loadu_ps(w.table);
  const int64_t pairs = w.k / 2 * kRows, blocks = w.k / w.bs * kRows;   // one tile's codes and scales
  const uint8_t* codes = w.codes + tile * pairs;
  const float* scales = w.scales + tile * blocks;
  for (int64_t b = 0; b < w.k / w.bs; ++b) {
    __m512 s[N];
    for (int n = 0; n < N; ++n) s[n] = _mm512_loadu_ps(scales + n * blocks + b * kRows);
    for (int64_t c = b * w.bs; c < (b + 1) * w.bs; c += 2) {
      __m512 w0[N], w1[N];
      for (int n = 0; n < N; ++n) {
        const __m512i q = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + n * pairs + c / 2 * kRows)));
        w0[n] = _mm512_mul_ps(_mm512_permutexvar_ps(q, table), s[n]);   // vpermps reads the low 4 bits
        w1[n] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table), s[n]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) {
        const __m512 xi = _mm512_set1_ps(r.x[c * T + i]);
        for (int n = 0; n < N; ++n) acc[n][i] = _mm512_fmadd_ps(xi, w0[n], acc[n][i]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) {
        const __m512 xi = _mm512_set1_ps(r.x[c * T + T + i]);
        for (int n = 0; n < N; ++n) acc[n][i] = _mm512_fmadd_ps(xi, w1[n], acc[n][i]);
      }
    }
  }
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < T; ++i) _mm512_storeu_ps(r.out + i * r.ldo + (tile + n) * kRows, acc[n][i]);
}

// ---- AVX2 + FMA: a tile as two halves of 8 rows; the 16-entry table as two 8-entry lookups and a blend ---
__attribute__((target("avx2,fma"))) inline __m256 lookup_avx2(__m256i q, __m256 low, __m256 high) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));   // bit 3 of the code to the sign
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, q), _mm256_permutevar8x32_ps(high, q), mask);
}

template <int T>
__attribute__((target("avx2,fma"))) void tile_avx2(const Nf4Weight& w, int64_t tile, const Rows& r) {
  const __m256 low = _mm256_loadu_ps(w.table), high = _mm256_loadu_ps(w.table + 8);
  const __m256i nibble = _mm256_set1_epi32(0xF);
  const uint8_t* codes = w.codes + tile * (w.k / 2) * kRows;
  const float* scales = w.scales + tile * (w.k / w.bs) * kRows;
  for (int64_t half = 0; half < kRows; half += 8) {
    __m256 acc[T];
    for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < w.k / w.bs; ++b) {
      const __m256 s = _mm256_loadu_ps(scales + b * kRows + half);
      for (int64_t c = b * w.bs; c < (b + 1) * w.bs; c += 2) {
        const __m256i q = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + c / 2 * kRows + half)));
        const __m256 w0 = _mm256_mul_ps(lookup_avx2(_mm256_and_si256(q, nibble), low, high), s);
        const __m256 w1 = _mm256_mul_ps(lookup_avx2(_mm256_srli_epi32(q, 4), low, high), s);
#pragma GCC unroll 8
        for (int i = 0; i < T; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(r.x[c * T + i]), w0, acc[i]);
#pragma GCC unroll 8
        for (int i = 0; i < T; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(r.x[c * T + T + i]), w1, acc[i]);
      }
    }
    for (int i = 0; i < T; ++i) _mm256_storeu_ps(r.out + i * r.ldo + tile * kRows + half, acc[i]);
  }
}

// ---- scalar: the same products and the same fused sums, one row at a time -------------------------------
template <int T>
void tile_scalar(const Nf4Weight& w, int64_t tile, const Rows& r) {
  const uint8_t* codes = w.codes + tile * (w.k / 2) * kRows;
  const float* scales = w.scales + tile * (w.k / w.bs) * kRows;
  for (int i = 0; i < T; ++i) {
    for (int64_t j = 0; j < kRows; ++j) {
      float acc = 0.0f;
      for (int64_t c = 0; c < w.k; c += 2) {
        const uint8_t byte = codes[c / 2 * kRows + j];
        const float s = scales[c / w.bs * kRows + j];
        const float w0 = w.table[byte & 0xF] * s, w1 = w.table[byte >> 4] * s;
        acc = std::fma(r.x[c * T + i], w0, acc);
        acc = std::fma(r.x[c * T + T + i], w1, acc);
      }
      r.out[i * r.ldo + tile * kRows + j] = acc;
    }
  }
}

struct Nf4 {
  using Weight = Nf4Weight;
  static constexpr int kAvx512Rows = 12, kAvx2Rows = 6, kScalarRows = 4;
  template <int N, int T> struct Avx512 { static void run(const Weight& w, int64_t t, const Rows& r) { tile_avx512<N, T>(w, t, r); } };
  template <int T> struct Avx2 { static void run(const Weight& w, int64_t t, const Rows& r) { tile_avx2<T>(w, t, r); } };
  template <int T> struct Scalar { static void run(const Weight& w, int64_t t, const Rows& r) { tile_scalar<T>(w, t, r); } };
};

at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& table, int64_t isa) {
  loraplex::tiles::check_input(x);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.size(2) == kRows && codes.is_contiguous(),
              "codes [n / 16, k / 2, 16] uint8, contiguous");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat && scales.size(2) == kRows &&
                  scales.size(0) == codes.size(0) && scales.is_contiguous(),
              "scales [n / 16, k / blocksize, 16] float32, contiguous");
  TORCH_CHECK(table.numel() == 16 && table.scalar_type() == at::kFloat && table.is_contiguous(), "table [16] float32");
  const int64_t m = x.size(0), k = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(codes.size(1) * 2 == k && scales.size(1) > 0 && k % scales.size(1) == 0 && (k / scales.size(1)) % 2 == 0,
              "x has ", k, " columns, the codes ", codes.size(1) * 2, " (and the scales must cover whole even blocks)");
  const Nf4Weight w{codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), table.data_ptr<float>(), k, k / scales.size(1)};
  return loraplex::tiles::run(x, w, tiles, loraplex::tiles::pick<Nf4>(isa, "nf4_linear"));
}

// The best variant this CPU runs (tiles::Isa: 1 scalar, 2 AVX2+FMA, 3 AVX-512), for the Python side to choose
// between these products and bitsandbytes' or torch's own.
int64_t tile_isa() { return loraplex::tiles::best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("nf4_linear(Tensor x, Tensor codes, Tensor scales, Tensor table, int isa=0) -> Tensor", &nf4_linear);
  m.def("tile_isa() -> int", &tile_isa);
}
