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
// rely on it). Here that holds by construction: every (sequence, head) is computed alone from its own rows
// with every sum in a fixed order, so neither the batch nor the threading nor the split of the work into
// tasks (a sequence, or one kv head's query heads of it) can change a bit. torch's own kernel keeps each
// row's bits in a shared call on some machines and not on others (decode_attention.py), which left those
// machines one attention call per sequence and layer.
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

constexpr int64_t kAhead = 4;    // rows of keys prefetched ahead

inline __attribute__((always_inline)) void prefetch_row(const float* row, int64_t bytes) {
  const char* at = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(at + i);
}

struct Cache {
  const float* keys;
  const float* values;
  int64_t row_stride;   // kv_heads * head_dim
  int64_t block_size;

  // The offset of position j's row, for a sequence with block table `table`.
  int64_t row(const int64_t* table, int64_t j) const {
    return (table[j / block_size] * block_size + j % block_size) * row_stride;
  }
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

// Query heads [first, last) of one sequence (q, out: [heads, Dim] of that sequence; head h reads kv head
// h / group) over its `length` positions, through its block table `table`. Rows are read whole, every head
// of the range from one pass. scores: scratch of heads * padded floats, padded = length rounded up to kLanes;
// totals: scratch of heads floats.
template <int64_t Dim>
inline __attribute__((always_inline)) void attend_heads(const float* q, const Cache& cache, const int64_t* table,
                                                        int64_t length, int64_t first, int64_t last, int64_t group,
                                                        float scale, float* scores, float* totals, float* out) {
  const int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
  const int64_t row_bytes = cache.row_stride * static_cast<int64_t>(sizeof(float));
  for (int64_t j = 0; j < length; ++j) {
    // the key row kAhead positions on and this position's value row are fetched while this one is used:
    // a step's rows are mostly in no cache yet (30 layers at batch 16, context 96, in a 512 MiB cache on a
    // 2-core AMD EPYC: 6.3 ms a step without, 5.5 ms with; a task per kv head instead of whole rows, 7.4 ms)
    if (j + kAhead < length) prefetch_row(cache.keys + cache.row(table, j + kAhead), row_bytes);
    prefetch_row(cache.values + cache.row(table, j), row_bytes);
    const float* keys = cache.keys + cache.row(table, j);
    for (int64_t h = first; h < last; ++h) scores[h * padded + j] = scale * dot<Dim>(q + h * Dim, keys + h / group * Dim);
  }
  for (int64_t h = first; h < last; ++h) totals[h] = softmax_weights(scores + h * padded, length, padded);
  std::fill(out + first * Dim, out + last * Dim, 0.0f);
  for (int64_t j = 0; j < length; ++j) {
    const float* values = cache.values + cache.row(table, j);
    for (int64_t h = first; h < last; ++h) {
      const float p = scores[h * padded + j];
      const float* v = values + h / group * Dim;
      float* o = out + h * Dim;
      for (int64_t d = 0; d < Dim; ++d) o[d] += p * v[d];
    }
  }
  for (int64_t h = first; h < last; ++h)
    for (int64_t d = 0; d < Dim; ++d) out[h * Dim + d] /= totals[h];
}

struct Step {
  const float* q;           // [B, H, D]
  Cache cache;
  const int64_t* tables;    // [B, width]
  const int64_t* lengths;   // [B]
  int64_t width, heads, kv_heads, dim;
  int64_t splits;           // tasks per sequence: 1 (all heads) or kv_heads (one kv head's group each)
  float scale;
  float* out;               // [B, H, D]
};

bool supported_dim(int64_t dim) {
  return dim == 32 || dim == 64 || dim == 80 || dim == 96 || dim == 128 || dim == 256;
}

// Tasks [begin, end) of the step: task t is sequence t / splits, heads of split t % splits. scores, totals:
// scratch for the longest sequence.
LORAPLEX_CLONES void attend_tasks(const Step& step, int64_t begin, int64_t end, float* scores, float* totals) {
  const int64_t group = step.heads / step.kv_heads, per_split = step.heads / step.splits;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / step.splits, first = task % step.splits * per_split, last = first + per_split;
    const float* q = step.q + b * step.heads * step.dim;
    const int64_t* table = step.tables + b * step.width;
    const int64_t n = step.lengths[b];
    float* out = step.out + b * step.heads * step.dim;
    switch (step.dim) {
      case 32: attend_heads<32>(q, step.cache, table, n, first, last, group, step.scale, scores, totals, out); break;
      case 64: attend_heads<64>(q, step.cache, table, n, first, last, group, step.scale, scores, totals, out); break;
      case 80: attend_heads<80>(q, step.cache, table, n, first, last, group, step.scale, scores, totals, out); break;
      case 96: attend_heads<96>(q, step.cache, table, n, first, last, group, step.scale, scores, totals, out); break;
      case 128: attend_heads<128>(q, step.cache, table, n, first, last, group, step.scale, scores, totals, out); break;
      default: attend_heads<256>(q, step.cache, table, n, first, last, group, step.scale, scores, totals, out); break;
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
  TORCH_CHECK(k_cache.size(2) == dim && supported_dim(dim) && kv_heads > 0 && heads % kv_heads == 0,
              "head_dim 32, 64, 80, 96, 128 or 256, heads a multiple of kv heads (", heads, " heads, ", kv_heads,
              " kv heads, dim ", dim, ")");
  TORCH_CHECK(block_size > 0, "block_size > 0");
  check_tables(tables, lengths, block_size, k_cache.size(0));
  auto out = at::empty_like(q);
  if (batch == 0) return out;
  const auto* n = lengths.data_ptr<int64_t>();
  // a task per sequence, reading its rows whole, unless the batch is too small to keep every thread busy
  const int64_t splits = batch >= at::get_num_threads() ? 1 : kv_heads;
  const Step step{q.data_ptr<float>(), {k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), kv_heads * dim, block_size},
                  tables.data_ptr<int64_t>(), n, tables.size(1), heads, kv_heads, dim, splits,
                  static_cast<float>(scale), out.data_ptr<float>()};
  const int64_t padded = (*std::max_element(n, n + batch) + kLanes - 1) / kLanes * kLanes;
  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * padded), totals(heads);
    attend_tasks(step, begin, end, scores.data(), totals.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lengths, "
        "int block_size, float scale) -> Tensor", &paged_decode_attention);
}
