// Paged decode attention for the CPU (float32): each decoding query over its own sequence's cached keys and
// values, read in place through the sequence's block table, so no step copies any context.
//
// Semantics, for sequence b of length L = lengths[b], query head h and its kv head c = h / (H / KVH):
//   row(j)   = tables[b, j / block_size] * block_size + j % block_size          (j < L)
//   s_j      = scale * <q[b, h], k_cache[row(j), c]>
//   out[b,h] = sum_j e^(s_j - max s) v_cache[row(j), c] / sum_j e^(s_j - max s)
// which is torch's scaled_dot_product_attention of the query over the sequence's first L keys (enable_gqa).
//
// A sequence's numbers must not depend on the rest of its batch (the batch-invariance tests' greedy answers
// rely on it). Here that holds by construction: work is split over (sequence, kv head) pairs, each computed
// alone from its own rows with every sum in a fixed order, so neither the batch nor the threading can change
// a bit. torch's own kernel keeps each row's bits in a shared call on some machines and not on others
// (decode_attention.py), which left those machines one attention call per sequence and layer.
//
// The hot loop is compiled for AVX-512, AVX2+FMA and plain x86-64 (GCC's target_clones, chosen once when
// the library loads), so one build serves any x86 machine; a given machine always runs the same variant.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;   // partial sums of the fixed-order reductions (every head_dim is a multiple)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORAPLEX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORAPLEX_CLONES
#endif

// e^x for x <= 0 (clamped below at -87, where e^x is 1.6e-38): 2^n e^r with |r| <= ln2/2 and e^r by its
// Taylor series to r^7 (truncation under 1e-7 relative). Branch-free, so the loops calling it vectorize.
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// The sums below run over kLanes partial sums in a fixed order (vectorizable without reassociation).
inline __attribute__((always_inline)) float reduce(float* acc) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

template <int64_t Dim>
inline __attribute__((always_inline)) float dot(const float* a, const float* b) {
  float acc[kLanes] = {};
  for (int64_t d0 = 0; d0 < Dim; d0 += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[d0 + l] * b[d0 + l];
  return reduce(acc);
}

struct Cache {
  const float* keys;
  const float* values;
  int64_t row_stride;   // kv_heads * head_dim
  int64_t block_size;
};

// Turns scores s[0, length) into e^(s - max s), zeroes the padding up to `padded` (a multiple of kLanes)
// and returns their sum.
inline __attribute__((always_inline)) float softmax_weights(float* s, int64_t length, int64_t padded) {
  float top = s[0];
  for (int64_t j = 1; j < length; ++j) top = std::max(top, s[j]);
  for (int64_t j = 0; j < padded; ++j) s[j] = exp_nonpositive(s[j] - top);
  for (int64_t j = length; j < padded; ++j) s[j] = 0.0f;
  float acc[kLanes] = {};
  for (int64_t j0 = 0; j0 < padded; j0 += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += s[j0 + l];
  return reduce(acc);
}

// The `group` query heads q [group, Dim] that share kv head `head`, over `length` positions of one sequence
// (its block table `table`). scores: scratch of group * padded floats, padded = length rounded up to
// kLanes; out: [group, Dim].
template <int64_t Dim>
inline __attribute__((always_inline)) void attend_group(const float* q, const Cache& cache, const int64_t* table, int64_t head,
                                  int64_t length, int64_t group, float scale, float* scores, float* out) {
  const int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
  for (int64_t j = 0; j < length; ++j) {
    const int64_t row = table[j / cache.block_size] * cache.block_size + j % cache.block_size;
    const float* key = cache.keys + row * cache.row_stride + head * Dim;
    for (int64_t g = 0; g < group; ++g) scores[g * padded + j] = scale * dot<Dim>(q + g * Dim, key);
  }
  float totals[64];
  for (int64_t g = 0; g < group; ++g) totals[g] = softmax_weights(scores + g * padded, length, padded);
  std::fill(out, out + group * Dim, 0.0f);
  for (int64_t j = 0; j < length; ++j) {
    const int64_t row = table[j / cache.block_size] * cache.block_size + j % cache.block_size;
    const float* value = cache.values + row * cache.row_stride + head * Dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * padded + j];
      float* o = out + g * Dim;
      for (int64_t d = 0; d < Dim; ++d) o[d] += p * value[d];
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < Dim; ++d) out[g * Dim + d] /= totals[g];
}

struct Step {
  const float* q;           // [B, H, D]
  Cache cache;
  const int64_t* tables;    // [B, width]
  const int64_t* lengths;   // [B]
  int64_t width, heads, kv_heads, dim;
  float scale;
  float* out;               // [B, H, D]
};

bool supported_dim(int64_t dim) {
  return dim == 32 || dim == 64 || dim == 80 || dim == 96 || dim == 128 || dim == 256;
}

// Tasks [begin, end) of the step's (sequence, kv head) pairs; scores: scratch for the longest sequence.
LORAPLEX_CLONES void attend_tasks(const Step& step, int64_t begin, int64_t end, float* scores) {
  const int64_t group = step.heads / step.kv_heads;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / step.kv_heads, head = task % step.kv_heads;
    const int64_t offset = (b * step.heads + head * group) * step.dim;
    const float* q = step.q + offset;
    const int64_t* table = step.tables + b * step.width;
    const int64_t n = step.lengths[b];
    float* out = step.out + offset;
    switch (step.dim) {
      case 32: attend_group<32>(q, step.cache, table, head, n, group, step.scale, scores, out); break;
      case 64: attend_group<64>(q, step.cache, table, head, n, group, step.scale, scores, out); break;
      case 80: attend_group<80>(q, step.cache, table, head, n, group, step.scale, scores, out); break;
      case 96: attend_group<96>(q, step.cache, table, head, n, group, step.scale, scores, out); break;
      case 128: attend_group<128>(q, step.cache, table, head, n, group, step.scale, scores, out); break;
      default: attend_group<256>(q, step.cache, table, head, n, group, step.scale, scores, out); break;
    }
  }
}

void check_tables(const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size, int64_t rows) {
  const int64_t batch = tables.size(0), width = tables.size(1);
  const auto* t = tables.data_ptr<int64_t>();
  const auto* n = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(n[b] >= 1 && n[b] <= width * block_size, "sequence ", b, " has length ", n[b],
                " outside 1..", width * block_size);
    for (int64_t i = 0; i < (n[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(t[b * width + i] >= 0 && (t[b * width + i] + 1) * block_size <= rows, "sequence ", b,
                  " names block ", t[b * width + i], " outside the cache");
  }
}

// q [B, H, D]; k_cache, v_cache [rows, KVH, D]; tables [B, W] int64 (blocks); lengths [B] int64 -> [B, H, D]
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "q [B, H, D], caches [rows, KVH, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "float32 query and caches");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous query and caches");
  TORCH_CHECK(tables.dim() == 2 && lengths.dim() == 1 && tables.size(0) == q.size(0) && lengths.size(0) == q.size(0) &&
                  tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  tables.is_contiguous() && lengths.is_contiguous(),
              "tables [B, W] and lengths [B], int64");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dim && supported_dim(dim) && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= 64,
              "head_dim 32, 64, 80, 96, 128 or 256 and up to 64 query heads per kv head (", heads, " heads, ",
              kv_heads, " kv heads, dim ", dim, ")");
  TORCH_CHECK(block_size > 0, "block_size > 0");
  check_tables(tables, lengths, block_size, k_cache.size(0));
  auto out = at::empty_like(q);
  if (batch == 0) return out;
  const auto* n = lengths.data_ptr<int64_t>();
  const Step step{q.data_ptr<float>(), {k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), kv_heads * dim, block_size},
                  tables.data_ptr<int64_t>(), n, tables.size(1), heads, kv_heads, dim, static_cast<float>(scale),
                  out.data_ptr<float>()};
  const int64_t padded = (*std::max_element(n, n + batch) + kLanes - 1) / kLanes * kLanes;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads / kv_heads * padded);
    attend_tasks(step, begin, end, scores.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lengths, "
        "int block_size, float scale) -> Tensor", &paged_decode_attention);
}
