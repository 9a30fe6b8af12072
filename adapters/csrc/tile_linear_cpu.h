// The driver shared by the weight-tile products (nf4_linear_cpu.cpp, bf16_linear_cpu.cpp): out = x @ Wᵀ with
// W stored in tiles of 16 output rows, each tile's columns in order, so one column of a tile is one register
// (AVX-512) or two (AVX2) and every input element is broadcast against it: no horizontal sums anywhere.
//
// Each output is one fixed sequence of fused multiply-adds over the columns in increasing order, so it
// depends only on its own input row and the weight, never on the batch, the threads or the tiling, and the
// AVX-512, AVX2+FMA and scalar (std::fma) variants give the same bits. A format (its `Weight` and three
// kernel templates, one per instruction set, each for T input rows, the AVX-512 one also for N = 1 or 2
// adjacent tiles) supplies how a column is read.

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
  const TileFn<W>* one;    // one[t - 1] handles t rows of one tile
  const TileFn<W>* two;    // two adjacent tiles, each input element broadcast once for both; or nullptr
};

template <class W, template <int> class K, int... T>
struct Table {
  static constexpr TileFn<W> fns[] = {&K<T + 1>::run...};
};

template <class W, template <int> class K, int... T>
constexpr const TileFn<W>* table(std::integer_sequence<int, T...>) {
  return Table<W, K, T...>::fns;
}

template <class F, int N>
struct Tiles {   // F's AVX-512 kernel for N tiles per call, as a template of the row count alone
  template <int T>
  using Kernel = typename F::template Avx512<N, T>;
};

// F: a format, with F::Weight and kernel templates F::Avx512<N, T> (N = 1 or 2 tiles), F::Avx2<T> and
// F::Scalar<T> (each a struct with static run(const Weight&, int64_t tile, const Rows&)), and the rows each
// holds in registers. On AVX-512 the broadcast of an input element costs about two FMAs' issue slots (a
// 2-core Ice Lake Xeon: 3.1 G broadcast FMAs a second against 5.6 G from registers), so tiles go in pairs
// and each broadcast serves both: the bf16 screen went from 2.1 to 4.4 G FMAs a second per core.
template <class F>
Variant<typename F::Weight> pick(int64_t isa, const char* op) {
  using W = typename F::Weight;
  static const Isa best = best_isa();
  const Isa want = isa == kAuto ? best : static_cast<Isa>(isa);
  TORCH_CHECK(want >= kScalar && want <= best, op, ": isa ", isa, " is not supported on this CPU (best ",
              static_cast<int64_t>(best), ")");
  if (want == kAvx512) {
    constexpr auto rows = std::make_integer_sequence<int, F::kAvx512Rows>{};
    return {F::kAvx512Rows, table<W, Tiles<F, 1>::template Kernel>(rows), table<W, Tiles<F, 2>::template Kernel>(rows)};
  }
  if (want == kAvx2)
    return {F::kAvx2Rows, table<W, F::template Avx2>(std::make_integer_sequence<int, F::kAvx2Rows>{}), nullptr};
  return {F::kScalarRows, table<W, F::template Scalar>(std::make_integer_sequence<int, F::kScalarRows>{}), nullptr};
}

// What every product takes as its input, checked before anything reads its shape.
inline void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x [m, k] float32, rows contiguous");
}

// Tiles per block of the loop: a block's weights (at most ~300 KiB here) stay in L2 while every row group
// runs over them, and one row group's columns (~27 KiB at 576 columns) stay in L1 for the whole block. Tile
// by tile over all groups instead, the groups' columns outgrow L1 from 24 rows on and the broadcasts miss:
// 2.4 against 3.6 G FMAs a second per core on a 2-core Ice Lake Xeon.
constexpr int64_t kBlockTiles = 16;

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
  const int64_t ldo = out.stride(0), width = v.two ? 2 : 1;   // tiles per call
  at::parallel_for(0, (tiles + width - 1) / width, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin * width; first < std::min(tiles, end * width); first += kBlockTiles) {
      const int64_t last = std::min({tiles, end * width, first + kBlockTiles});
      for (int64_t i = 0; i < m; i += v.max_rows) {
        const int64_t rows = std::min<int64_t>(v.max_rows, m - i);
        const Rows r{columns.data() + i * k, os + i * ldo, ldo};
        for (int64_t t = first; t < last; t += width) (t + 1 < last && v.two ? v.two : v.one)[rows - 1](w, t, r);
      }
    }
  });
  return out;
}

}  // namespace loraplex::tiles
