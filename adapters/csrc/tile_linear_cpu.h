// The driver shared by the weight-tile products (nf4_linear_cpu.cpp, bf16_linear_cpu.cpp): out = x @ Wᵀ with
// W stored in tiles of 16 output rows, each tile's columns in order, so one column of a tile is one register
// (AVX-512) or two (AVX2) and every input element is broadcast against it: no horizontal sums anywhere.
//
// Each output is one fixed sequence of fused multiply-adds over the columns in increasing order, so it
// depends only on its own input row and the weight, never on the batch, the threads or the tiling, and the
// AVX-512, AVX2+FMA and scalar (std::fma) variants give the same bits. A format (its `Weight` and three
// kernel templates, one per instruction set, each for T input rows) supplies how a column is read.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace loraplex::tiles {

constexpr int64_t kRows = 16;   // output rows per tile

struct Rows {   // T input rows, column-major (x[c * T + i] is row i's column c), and where their outputs go
  const float* x;
  float* out;
  int64_t ldo;
};

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

template <class W>
using TileFn = void (*)(const W&, int64_t, const Rows&);

template <class W>
struct Variant {
  int max_rows;            // input rows per call (what the registers hold)
  const TileFn<W>* fns;    // fns[t - 1] handles t rows
};

template <class W, template <int> class K, int... T>
struct Table {
  static constexpr TileFn<W> fns[] = {&K<T + 1>::run...};
};

template <class W, template <int> class K, int... T>
constexpr Variant<W> variant(std::integer_sequence<int, T...>) {
  return {static_cast<int>(sizeof...(T)), Table<W, K, T...>::fns};
}

// F: a format, with F::Weight and kernel templates F::Avx512<T>, F::Avx2<T>, F::Scalar<T> (each a struct with
// static run(const Weight&, int64_t tile, const Rows&)) and the rows each holds in registers.
template <class F>
Variant<typename F::Weight> pick(int64_t isa, const char* op) {
  using W = typename F::Weight;
  static const Isa best = best_isa();
  const Isa want = isa == kAuto ? best : static_cast<Isa>(isa);
  TORCH_CHECK(want >= kScalar && want <= best, op, ": isa ", isa, " is not supported on this CPU (best ",
              static_cast<int64_t>(best), ")");
  if (want == kAvx512) return variant<W, F::template Avx512>(std::make_integer_sequence<int, F::kAvx512Rows>{});
  if (want == kAvx2) return variant<W, F::template Avx2>(std::make_integer_sequence<int, F::kAvx2Rows>{});
  return variant<W, F::template Scalar>(std::make_integer_sequence<int, F::kScalarRows>{});
}

// What every product takes as its input, checked before anything reads its shape.
inline void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x [m, k] float32, rows contiguous");
}

// x [m, k] float32 (rows contiguous) times the `tiles` tiles of w: [m, tiles * 16] float32.
template <class W>
at::Tensor run(const at::Tensor& x, const W& w, int64_t tiles, const Variant<W>& v) {
  const int64_t m = x.size(0), k = x.size(1);
  auto out = at::empty({m, tiles * kRows}, x.options());
  // each group of up to max_rows input rows column-major, so a kernel reads them from one pointer
  const float* xs = x.data_ptr<float>();
  std::vector<float> columns(m * k);
  for (int64_t i = 0; i < m; i += v.max_rows) {
    const int64_t rows = std::min<int64_t>(v.max_rows, m - i);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t c = 0; c < k; ++c) columns[i * k + c * rows + j] = xs[(i + j) * x.stride(0) + c];
  }
  float* os = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t i = 0; i < m; i += v.max_rows) {
        const int64_t rows = std::min<int64_t>(v.max_rows, m - i);
        v.fns[rows - 1](w, t, Rows{columns.data() + i * k, os + i * out.stride(0), out.stride(0)});
      }
  });
  return out;
}

}  // namespace loraplex::tiles
