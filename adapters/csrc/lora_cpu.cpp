// Segmented LoRA shrink/expand for the CPU (float32): the segment loop of ops.py, in one call per op.
//
// A decode step with many adapters is many tiny matrix products, one or a few tokens per segment. As
// torch matmuls from Python each costs ~10-20 us of dispatch, far more than its arithmetic. Here one call
// walks all segments:
// - A segment of several tokens (a prefill) goes to the BLAS routine (sgemm_) with the arguments torch's own
//   `x @ w.T` uses, from the calling thread, threaded by BLAS itself as torch's call would be: its bits are
//   the matmul's.
// - A one-token segment, the bulk of a decode step, goes to lora_token_cpu.cpp: a product with one vector,
//   summed in a fixed order of its own, so its bits depend on nothing but its own row and factors. These are
//   spread over torch's own thread pool (at::parallel_for, so no second OpenMP pool).
// tests/test_lora_ops.py checks both: the first bit for bit against the loop, the second against its row
// alone and at one thread.
//
// Semantics, segment i = tokens [starts[i], ends[i]) on slot s = slots[i], r = ranks[s]:
//   lora_shrink: out[starts[i]:ends[i], :r]  = x[starts[i]:ends[i]] @ a_stack[s, :r, :].T
//   lora_expand: out[starts[i]:ends[i], :]  += y[starts[i]:ends[i], :r] @ b_stack[s, :, :r].T
// a_stack [S, R, in], b_stack [S, n, R] (contiguous); segments [3, num_segments] int64 (starts, ends, slots);
// ranks [S] int64. Tokens outside every segment (base-only) are not touched.
//
// Slots saved in 16 bits (stored [S] int64: 0 float32, 1 bfloat16, 2 float16; absent = all float32) hold the
// adapter as saved, packed at the start of the slot's float32 rows: A as [r, in], B as [n, r] without its
// scaling, which b_scale [S] float32 gives. A one-token segment reads them as they are, widening in
// registers; a longer one first widens its factors (times the scale for B) into a float32 copy laid out as a
// float32 slot is, then makes the same BLAS call. Widening is exact and the scale is the float32 product the
// reader would have folded in, so either way the bits are the float32 slot's while a step reads half the
// bytes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "lora_token_cpu.h"

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// c[rows, cols] (row stride ldc) = x[rows, depth] (row stride ldx) @ w[cols, depth].T (row stride ldw).
// Column-major view: c.T = op_T(w) @ x.T, exactly the call torch's addmm makes for a row-major x @ w.T.
void linear_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, float* c, int64_t ldc,
                 int64_t rows, int64_t cols, int64_t depth) {
  const int m = static_cast<int>(cols), n = static_cast<int>(rows), k = static_cast<int>(depth);
  const int lda = static_cast<int>(ldw), ldb = static_cast<int>(ldx), ldc_ = static_cast<int>(ldc);
  const float one = 1.f, zero = 0.f;
  const char trans = 'T', no_trans = 'N';
  sgemm_(&trans, &no_trans, &m, &n, &k, &one, w, &lda, x, &ldb, &zero, c, &ldc_);
}

using loraplex::kBFloat16;
using loraplex::kFloat32;
using loraplex::Stored;

// A float32 scratch of at least `count` elements, 64-byte aligned like torch's own buffers, one per thread.
float* scratch(int64_t count) {
  struct Free { void operator()(float* p) const { std::free(p); } };
  thread_local std::unique_ptr<float, Free> buffer;
  thread_local int64_t capacity = 0;
  if (count > capacity) {
    const int64_t bytes = ((count * static_cast<int64_t>(sizeof(float)) + 63) / 64) * 64;
    buffer.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(buffer, "out of memory widening an adapter");
    capacity = bytes / static_cast<int64_t>(sizeof(float));
  }
  return buffer.get();
}

template <typename Half>
void widen_rows(const Half* src, int64_t rows, int64_t cols, float scale, float* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[i * ld + j] = static_cast<float>(src[i * cols + j]) * scale;
  }
}

// The 16-bit factor [rows, cols] packed at `src`, widened (times scale) into rows of stride ld of a scratch.
const float* widened(const void* src, Stored stored, int64_t rows, int64_t cols, float scale, int64_t ld) {
  float* dst = scratch(rows * ld);
  if (stored == kBFloat16) {
    widen_rows(static_cast<const c10::BFloat16*>(src), rows, cols, scale, dst, ld);
  } else {
    widen_rows(static_cast<const c10::Half*>(src), rows, cols, scale, dst, ld);
  }
  return dst;
}

const int64_t* stored_of(const std::optional<at::Tensor>& stored, int64_t num_slots) {
  if (!stored.has_value()) return nullptr;
  TORCH_CHECK(stored->scalar_type() == at::kLong && stored->is_contiguous() && stored->numel() == num_slots,
              "stored must be int64 [num_slots]");
  return stored->data_ptr<int64_t>();
}

struct SegmentTable {
  const int64_t* starts;
  const int64_t* ends;
  const int64_t* slots;
  int64_t size;
};

// fn(i) for every non-empty segment i: multi-token ones in order on this thread, then the single-token
// ones in parallel.
template <typename Fn>
void for_each_segment(const SegmentTable& seg, const Fn& fn) {
  for (int64_t i = 0; i < seg.size; ++i) {
    if (seg.ends[i] - seg.starts[i] > 1) fn(i);
  }
  at::parallel_for(0, seg.size, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (seg.ends[i] - seg.starts[i] == 1) fn(i);
    }
  });
}

SegmentTable table_of(const at::Tensor& segments, const at::Tensor& ranks, int64_t num_slots) {
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(0) == 3 &&
                  segments.is_contiguous(), "segments must be int64 [3, num_segments]");
  TORCH_CHECK(ranks.scalar_type() == at::kLong && ranks.is_contiguous() && ranks.numel() == num_slots,
              "ranks must be int64 [num_slots]");
  const int64_t n = segments.size(1);
  const int64_t* p = segments.data_ptr<int64_t>();
  return {p, p + n, p + 2 * n, n};
}

void check_tensors(const at::Tensor& x, const at::Tensor& stack, const at::Tensor& out) {
  for (const at::Tensor* t : {&x, &stack, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "float32 CPU tensors only");
  }
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1,
              "x and out must be 2-D with contiguous rows");
  TORCH_CHECK(stack.dim() == 3 && stack.is_contiguous(), "the slot stack must be a contiguous 3-D tensor");
  TORCH_CHECK(x.size(0) == out.size(0), "x and out must have one row per token");
}

// One segment as an op reads it: its tokens [start, start + len), its slot, that slot's rank and storage.
struct Segment {
  int64_t start, len, slot, rank;
  Stored stored;
};

// The segments of a step with one target's per-slot ranks and storage, validated.
struct SlotSegments {
  SegmentTable seg;
  const int64_t* rank;
  const int64_t* kind;

  SlotSegments(const at::Tensor& segments, const at::Tensor& ranks, const std::optional<at::Tensor>& stored,
               int64_t num_slots)
      : seg(table_of(segments, ranks, num_slots)), rank(ranks.data_ptr<int64_t>()),
        kind(stored_of(stored, num_slots)) {}

  Segment at(int64_t i) const {
    const int64_t s = seg.slots[i];
    return {seg.starts[i], seg.ends[i] - seg.starts[i], s, rank[s],
            kind == nullptr ? kFloat32 : static_cast<Stored>(kind[s])};
  }
};

// One target's shrink, validated: segment(i) writes y's rows of segment i (columns :r).
struct Shrink {
  SlotSegments segs;
  const float* x;
  const float* a;
  float* y;
  int64_t ldx, ldy, max_rank, in;

  Shrink(const at::Tensor& x_, const at::Tensor& a_stack, const at::Tensor& segments, const at::Tensor& ranks,
         const at::Tensor& out, const std::optional<at::Tensor>& stored)
      : segs(segments, ranks, stored, a_stack.size(0)) {
    check_tensors(x_, a_stack, out);
    max_rank = a_stack.size(1), in = a_stack.size(2);
    TORCH_CHECK(x_.size(1) == in && out.size(1) >= max_rank, "lora_shrink: shape mismatch");
    x = x_.data_ptr<float>(), a = a_stack.data_ptr<float>(), y = out.data_ptr<float>();
    ldx = x_.stride(0), ldy = out.stride(0);
  }

  void segment(int64_t i) const {
    const Segment g = segs.at(i);
    if (g.rank == 0) return;
    const float* as = a + g.slot * max_rank * in;
    if (g.len == 1) return loraplex::shrink_token(x + g.start * ldx, as, g.stored, in, g.rank, y + g.start * ldy);
    if (g.stored != kFloat32) as = widened(as, g.stored, g.rank, in, 1.f, in);
    linear_rows(x + g.start * ldx, ldx, as, in, y + g.start * ldy, ldy, g.len, g.rank, in);
  }
};

// One target's expand, validated: segment(i) adds segment i's delta into its rows of out.
struct Expand {
  SlotSegments segs;
  const float* y;
  const float* b;
  const float* scale;
  float* out;
  int64_t ldy, ldo, n, max_rank;

  Expand(const at::Tensor& y_, const at::Tensor& b_stack, const at::Tensor& segments, const at::Tensor& ranks,
         const at::Tensor& out_, const std::optional<at::Tensor>& stored, const std::optional<at::Tensor>& b_scale)
      : segs(segments, ranks, stored, b_stack.size(0)) {
    check_tensors(y_, b_stack, out_);
    n = b_stack.size(1), max_rank = b_stack.size(2);
    TORCH_CHECK(y_.size(1) >= max_rank && out_.size(1) == n, "lora_expand: shape mismatch");
    TORCH_CHECK(segs.kind == nullptr || (b_scale.has_value() && b_scale->scalar_type() == at::kFloat &&
                                         b_scale->is_contiguous() && b_scale->numel() == b_stack.size(0)),
                "16-bit slots need b_scale float32 [num_slots]");
    scale = segs.kind == nullptr ? nullptr : b_scale->data_ptr<float>();
    y = y_.data_ptr<float>(), b = b_stack.data_ptr<float>(), out = out_.data_ptr<float>();
    ldy = y_.stride(0), ldo = out_.stride(0);
  }

  void segment(int64_t i) const {
    const Segment g = segs.at(i);
    if (g.rank == 0) return;
    const float* bs = b + g.slot * n * max_rank;
    if (g.len == 1) {
      const bool packed = g.stored != kFloat32;     // 16-bit factors sit packed as [n, r], scale beside them
      return loraplex::expand_token(y + g.start * ldy, bs, g.stored, packed ? g.rank : max_rank, n, g.rank,
                                    packed ? scale[g.slot] : 1.f, out + g.start * ldo);
    }
    // [len, n]: the product first, then one add, as torch's `out += y @ b.T` rounds
    thread_local std::vector<float> delta;
    delta.resize(g.len * n);
    if (g.stored != kFloat32) bs = widened(bs, g.stored, n, g.rank, scale[g.slot], max_rank);
    linear_rows(y + g.start * ldy, ldy, bs, max_rank, delta.data(), n, g.len, n, g.rank);
    for (int64_t t = 0; t < g.len; ++t) {
      float* dst = out + (g.start + t) * ldo;
      const float* src = delta.data() + t * n;
      for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
    }
  }
};

void lora_shrink(const at::Tensor& x, const at::Tensor& a_stack, const at::Tensor& segments,
                 const at::Tensor& ranks, at::Tensor out, const std::optional<at::Tensor>& stored) {
  const Shrink shrink(x, a_stack, segments, ranks, out, stored);
  for_each_segment(shrink.segs.seg, [&](int64_t i) { shrink.segment(i); });
}

void lora_expand(const at::Tensor& y, const at::Tensor& b_stack, const at::Tensor& segments,
                 const at::Tensor& ranks, at::Tensor out, const std::optional<at::Tensor>& stored,
                 const std::optional<at::Tensor>& b_scale) {
  const Expand expand(y, b_stack, segments, ranks, out, stored, b_scale);
  for_each_segment(expand.segs.seg, [&](int64_t i) { expand.segment(i); });
}

// Every target of one packed module in one call: target t's shrink then expand into out's columns
// [offsets[t], offsets[t] + n_t), all reading x; the same work, in the same arithmetic, as a lora_shrink and
// a lora_expand per target, with one parallel region for all of them. stored and b_scale: one per target,
// or none (all float32).
void lora_apply(const at::Tensor& x, const std::vector<at::Tensor>& a_stacks, const std::vector<at::Tensor>& b_stacks,
                const std::vector<at::Tensor>& ranks, const std::vector<int64_t>& offsets, const at::Tensor& segments,
                at::Tensor out, const std::vector<at::Tensor>& stored, const std::vector<at::Tensor>& b_scale) {
  const size_t targets = a_stacks.size();
  TORCH_CHECK(b_stacks.size() == targets && ranks.size() == targets && offsets.size() == targets &&
                  (stored.empty() || stored.size() == targets) && stored.size() == b_scale.size(),
              "lora_apply: one stack, rank table and offset per target");
  int64_t max_rank = 0;
  for (const at::Tensor& a : a_stacks) max_rank = std::max(max_rank, a.size(1));
  const at::Tensor shrunk = at::zeros({x.size(0), max_rank}, x.options());   // base rows stay 0
  std::vector<Shrink> shrinks;
  std::vector<Expand> expands;
  for (size_t t = 0; t < targets; ++t) {
    const std::optional<at::Tensor> kind = stored.empty() ? std::nullopt : std::optional(stored[t]);
    const std::optional<at::Tensor> scale = b_scale.empty() ? std::nullopt : std::optional(b_scale[t]);
    const int64_t n = b_stacks[t].size(1);
    TORCH_CHECK(offsets[t] >= 0 && offsets[t] + n <= out.size(1), "lora_apply: a target outside out");
    shrinks.emplace_back(x, a_stacks[t], segments, ranks[t], shrunk, kind);
    expands.emplace_back(shrunk, b_stacks[t], segments, ranks[t], out.narrow(1, offsets[t], n), kind, scale);
  }
  for_each_segment(shrinks.at(0).segs.seg, [&](int64_t i) {
    for (size_t t = 0; t < targets; ++t) {
      shrinks[t].segment(i);
      expands[t].segment(i);
    }
  });
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def("lora_shrink(Tensor x, Tensor a_stack, Tensor segments, Tensor ranks, Tensor(a!) out, "
        "Tensor? stored=None) -> ()");
  m.def("lora_expand(Tensor y, Tensor b_stack, Tensor segments, Tensor ranks, Tensor(a!) out, "
        "Tensor? stored=None, Tensor? b_scale=None) -> ()");
  m.def("lora_apply(Tensor x, Tensor[] a_stacks, Tensor[] b_stacks, Tensor[] ranks, int[] offsets, Tensor segments, "
        "Tensor(a!) out, Tensor[] stored, Tensor[] b_scale) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_expand", &lora_expand);
  m.impl("lora_apply", &lora_apply);
}
