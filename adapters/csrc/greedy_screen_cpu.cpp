// The output head's greedy screen, after the scores (server/model/lm_head.py, OutputHead.greedy): for each row,
// every token whose float32 logit may still be the row's largest, given a bound on each score's error.
//
// With slack(t) = (bound * |x|) * |w_t|, a token stays when score(t) + slack(t) >= max over u of
// (score(u) - slack(u)). The same float32 operations as the torch expression in lm_head.py, in two passes
// over a row and without its [n, vocab] temporaries: in torch those cost 5.7 ms at 32 rows of a 49,152-token
// vocabulary on a 2-core Ice Lake Xeon, more than the bf16 products themselves (docs/decode-profile.md).

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "tile_linear_cpu.h"   // best_isa

namespace {

// One row: (bound * |x|) as `scale`, the row's scores s, the tokens' norms; appends its candidates to kept.
void row_scalar(const float* s, const float* norms, int64_t vocab, float scale, std::vector<int64_t>& kept) {
  float floor = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < vocab; ++t) floor = std::max(floor, s[t] - scale * norms[t]);
  for (int64_t t = 0; t < vocab; ++t)
    if (s[t] + scale * norms[t] >= floor) kept.push_back(t);
}

__attribute__((target("avx512f"))) void row_avx512(const float* s, const float* norms, int64_t vocab, float scale,
                                                   std::vector<int64_t>& kept) {
  const int64_t whole = vocab / 16 * 16;
  const __m512 k = _mm512_set1_ps(scale);
  __m512 lows = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < whole; t += 16)
    lows = _mm512_max_ps(lows, _mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_mul_ps(k, _mm512_loadu_ps(norms + t))));
  float floor = _mm512_reduce_max_ps(lows);
  for (int64_t t = whole; t < vocab; ++t) floor = std::max(floor, s[t] - scale * norms[t]);
  const __m512 f = _mm512_set1_ps(floor);
  for (int64_t t = 0; t < whole; t += 16) {
    const __m512 high = _mm512_add_ps(_mm512_loadu_ps(s + t), _mm512_mul_ps(k, _mm512_loadu_ps(norms + t)));
    for (uint32_t mask = _mm512_cmp_ps_mask(high, f, _CMP_GE_OQ); mask; mask &= mask - 1)
      kept.push_back(t + __builtin_ctz(mask));
  }
  for (int64_t t = whole; t < vocab; ++t)
    if (s[t] + scale * norms[t] >= floor) kept.push_back(t);
}

// scores [n, >= vocab] float32 (a banned token's score set to -inf), hidden_norms [n], row_norms [vocab]:
// (tokens, counts): row i's candidates ascending, counts[i] of them, rows one after another. No fused
// multiply-adds (the build is ISO C++, -std=c++20, where GCC contracts nothing), so each bound is the torch
// expression's bits.
std::tuple<at::Tensor, at::Tensor> screen_candidates(const at::Tensor& scores, const at::Tensor& hidden_norms,
                                                     const at::Tensor& row_norms, double bound) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.stride(1) == 1,
              "scores [n, vocab] float32, rows contiguous");
  TORCH_CHECK(row_norms.dim() == 1 && row_norms.scalar_type() == at::kFloat && row_norms.is_contiguous() &&
                  row_norms.size(0) <= scores.size(1), "row_norms [vocab] float32, at most as many as the scores' columns");
  TORCH_CHECK(hidden_norms.dim() == 1 && hidden_norms.scalar_type() == at::kFloat && hidden_norms.is_contiguous() &&
                  hidden_norms.size(0) == scores.size(0), "hidden_norms [n] float32, one per row of scores");
  const int64_t n = scores.size(0), vocab = row_norms.size(0);
  const float* norms = row_norms.data_ptr<float>();
  static const bool wide = loraplex::tiles::best_isa() == loraplex::tiles::kAvx512;
  std::vector<std::vector<int64_t>> kept(n);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* s = scores.data_ptr<float>() + i * scores.stride(0);
      const float scale = static_cast<float>(bound) * hidden_norms.data_ptr<float>()[i];
      (wide ? row_avx512 : row_scalar)(s, norms, vocab, scale, kept[i]);
    }
  });
  auto counts = at::empty({n}, at::kLong);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += counts.data_ptr<int64_t>()[i] = static_cast<int64_t>(kept[i].size());
  auto tokens = at::empty({total}, at::kLong);
  int64_t* out = tokens.data_ptr<int64_t>();
  for (const auto& row : kept) out = std::copy(row.begin(), row.end(), out);
  return {tokens, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("screen_candidates(Tensor scores, Tensor hidden_norms, Tensor row_norms, float bound) -> (Tensor, Tensor)",
        &screen_candidates);
}
