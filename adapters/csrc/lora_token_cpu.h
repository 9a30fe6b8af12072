// One token's LoRA shrink and expand for the CPU, in float32 with every sum in a fixed order
// (lora_token_cpu.cpp). lora_cpu.cpp hands them its single-token segments, the bulk of a decode step.
#pragma once

#include <cstdint>

namespace loraplex {

// How a slot's factors are stored: float32, or as saved in 16 bits (packed, see lora_cpu.cpp).
enum Stored : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// y[i] = sum_j a[i, j] * x[j] for i < r: a is [r, in] of `stored` elements with rows of `in`.
void shrink_token(const float* x, const void* a, Stored stored, int64_t in, int64_t r, float* y);

// out[o] += sum_k (b[o, k] * scale) * y[k] for o < n, k < r: b is [n, r] of `stored` elements with rows of
// `ld` elements (ld >= r).
void expand_token(const float* y, const void* b, Stored stored, int64_t ld, int64_t n, int64_t r, float scale,
                  float* out);

}  // namespace loraplex
