// One token's LoRA shrink and expand (lora_token_cpu.h): products with one vector, a decode step's bulk.
//
// Every dot product runs in one fixed order: over 16 lanes, lane l summing the terms j = l (mod 16) in
// increasing j, then the lanes folded in halves (l += l + 8, then + 4, + 2, + 1). So a token's result depends
// only on its own row and the adapter's factors, never on the batch, the threads, or how many tokens or
// adapters share the call (a sequence answers alone as beside others), and a factor stored in 16 bits gives
// the bits of its float32 widening: widening is exact, and B's scale is applied to each widened element
// first, which is the float32 product a float32 slot holds folded in. The results are not the bits of a BLAS
// call (BLAS sums in an order of its own): the kernels read the factors at about 1.2x the rate of the sgemm
// calls they replace and read 16-bit factors without widening them into a copy first (docs/decode-profile.md).
//
// Rows are handled 16 at a time, each with its own accumulator, and the 16 sums of a block are folded into
// one vector together (`fold`), so an expand of n outputs reads its rows of B once, contiguously. The hot
// loops are compiled for AVX-512, AVX2+FMA and plain x86-64 (GCC's target_clones, picked once when the
// library loads); a machine always runs the same variant, so its bits never change from call to call.

#include "lora_token_cpu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

namespace loraplex {
namespace {

constexpr int64_t kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORAPLEX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORAPLEX_CLONES
#endif

typedef float Lanes __attribute__((vector_size(64)));
typedef int32_t Picks __attribute__((vector_size(64)));
typedef uint16_t Halves __attribute__((vector_size(32)));
typedef uint32_t Words __attribute__((vector_size(64)));
typedef _Float16 Float16s __attribute__((vector_size(32)));

#define INLINE inline __attribute__((always_inline))

// 16 elements at p, widened to float32.
template <typename T>
INLINE Lanes widen(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    Lanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    Halves h;
    std::memcpy(&h, p, sizeof h);
    const Words w = __builtin_convertvector(h, Words) << 16;   // bfloat16 is float32's upper half
    Lanes v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  } else {
    Float16s h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, Lanes);
  }
}

INLINE void store(float* p, Lanes v, int64_t valid) { std::memcpy(p, &v, std::min(valid, kLanes) * sizeof(float)); }

// out lane i = the lanes of acc[i] folded in halves (l += l + 8, + 4, + 2, + 1), for 16 accumulators at once:
// each level adds the upper half of every accumulator's live lanes to its lower half, packing two
// accumulators' results into one vector.
INLINE Lanes fold(Lanes* acc) {
  constexpr Picks low8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  constexpr Picks high8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  constexpr Picks low4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  constexpr Picks high4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  constexpr Picks low2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  constexpr Picks high2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  constexpr Picks even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  constexpr Picks odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  Lanes s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; ++i)
    s8[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], low8) + __builtin_shuffle(acc[2 * i], acc[2 * i + 1], high8);
  for (int i = 0; i < 4; ++i)
    s4[i] = __builtin_shuffle(s8[2 * i], s8[2 * i + 1], low4) + __builtin_shuffle(s8[2 * i], s8[2 * i + 1], high4);
  for (int i = 0; i < 2; ++i)
    s2[i] = __builtin_shuffle(s4[2 * i], s4[2 * i + 1], low2) + __builtin_shuffle(s4[2 * i], s4[2 * i + 1], high2);
  return __builtin_shuffle(s2[0], s2[1], even) + __builtin_shuffle(s2[0], s2[1], odd);
}

// Zeros standing in for the missing rows of a partial block of 16: at least `count` elements of T.
template <typename T>
const T* zeros(int64_t count) {
  thread_local std::unique_ptr<T[]> buffer;
  thread_local int64_t capacity = 0;
  if (count > capacity) {
    buffer.reset(new T[count]());
    capacity = count;
  }
  return buffer.get();
}

// The rows of a whole block of 16: consecutive rows of `ld` elements.
template <typename T>
struct Strided {
  const T* first;
  int64_t ld;
  INLINE const T* operator[](int64_t i) const { return first + i * ld; }
};

// The rows of a partial block: the ones there are, then zeros.
template <typename T>
struct Listed {
  const T* rows[kLanes];
  INLINE const T* operator[](int64_t i) const { return rows[i]; }
};

// A scale of exactly 1 (every shrink; the expand of a float32 slot, whose B holds its scaling already):
// multiplying by it changes no bit, so it is left out, which halves the arithmetic of the shrink's loop.
struct One {};
INLINE Lanes operator*(Lanes v, One) { return v; }

// acc[i] += (row[i][j0 + l] * scale) * v[j0 + l] in lane l, for the 16 rows of a block. Scale: float or One.
template <typename T, typename Rows, typename Scale>
INLINE void accumulate(const Rows& row, int64_t j0, const float* v, Scale scale, Lanes* acc) {
  const Lanes vv = widen(v + j0);
  for (int64_t i = 0; i < kLanes; ++i) acc[i] += widen(row[i] + j0) * scale * vv;
}

// The 16 sums sum_j (row[i][j] * scale) * v[j], j < depth, in lane i of the result. A last part of fewer
// than 16 columns is copied out with zeros after it first (reading nothing past a row's end).
template <typename T, typename Rows, typename Scale>
INLINE Lanes block_products(const Rows& row, int64_t depth, const float* v, Scale scale) {
  Lanes acc[kLanes] = {};
  const int64_t whole = depth / kLanes * kLanes;
  for (int64_t j0 = 0; j0 < whole; j0 += kLanes) accumulate<T>(row, j0, v, scale, acc);
  if (whole < depth) {
    T part[kLanes][kLanes] = {};
    float v_part[kLanes] = {};
    for (int64_t i = 0; i < kLanes; ++i)
      std::memcpy(static_cast<void*>(part[i]), row[i] + whole, (depth - whole) * sizeof(T));
    std::memcpy(v_part, v + whole, (depth - whole) * sizeof(float));
    accumulate<T>(Strided<T>{part[0], kLanes}, 0, v_part, scale, acc);
  }
  return fold(acc);
}

// out[i] (+)= sum_j (m[i, j] * scale) * v[j] for i < rows, j < depth: rows of `ld` elements. With add,
// each sum is added to out[i] (after the sum is complete).
template <typename T, typename Scale>
LORAPLEX_CLONES void products(const T* m, int64_t ld, int64_t rows, int64_t depth, const float* v, Scale scale,
                              bool add, float* out) {
  int64_t first = 0;
  for (; first + kLanes <= rows; first += kLanes) {
    Lanes sums = block_products<T>(Strided<T>{m + first * ld, ld}, depth, v, scale);
    if (add) sums = widen(out + first) + sums;
    store(out + first, sums, kLanes);
  }
  if (first < rows) {
    Listed<T> row;
    const T* zero = zeros<T>(depth);
    for (int64_t i = 0; i < kLanes; ++i) row.rows[i] = first + i < rows ? m + (first + i) * ld : zero;
    Lanes sums = block_products<T>(row, depth, v, scale);
    if (add) {
      float old[kLanes] = {};
      std::memcpy(old, out + first, (rows - first) * sizeof(float));
      sums = widen(old) + sums;
    }
    store(out + first, sums, rows - first);
  }
}

template <typename Fn>
void with_type(Stored stored, const void* p, const Fn& fn) {
  if (stored == kBFloat16) fn(static_cast<const c10::BFloat16*>(p));
  else if (stored == kFloat16) fn(static_cast<const c10::Half*>(p));
  else fn(static_cast<const float*>(p));
}

}  // namespace

void shrink_token(const float* x, const void* a, Stored stored, int64_t in, int64_t r, float* y) {
  with_type(stored, a, [&](const auto* m) { products(m, in, r, in, x, One{}, false, y); });
}

void expand_token(const float* y, const void* b, Stored stored, int64_t ld, int64_t n, int64_t r, float scale,
                  float* out) {
  with_type(stored, b, [&](const auto* m) {
    if (scale == 1.f) return products(m, ld, n, r, y, One{}, true, out);
    products(m, ld, n, r, y, scale, true, out);
  });
}

}  // namespace loraplex
