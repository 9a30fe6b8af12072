// Host-side helpers of the CPU adapter path: one adapter copied into its slot in one call, a flat buffer
// split into its factors' views, and a thread kept off torch's thread pool. Registered into the same
// `loraplex` op library as the LoRA ops (lora_cpu.cpp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include "lora_token_cpu.h"

#include <cstdint>
#include <cstring>
#include <vector>

using loraplex::kBFloat16;
using loraplex::kFloat16;

namespace {

// Makes the calling thread run torch's parallel regions on itself alone, leaving every other thread as it
// was. torch.set_num_threads would also change the default of threads that have not run parallel work yet
// (an engine thread started later, say). torch sets a thread's OpenMP team size lazily, on its first
// parallel call, so that happens first; then only this thread's OpenMP setting changes. For helper threads
// (adapter loading) on a machine whose cores the engine's thread pool already uses.
void use_one_thread() {
  at::get_num_threads();
  omp_set_num_threads(1);
}

void reset_slot(const at::Tensor& table, int64_t slot, at::ScalarType type, const char* what) {
  TORCH_CHECK(table.scalar_type() == type && table.is_contiguous() && table.dim() == 2, what);
  for (int64_t layer = 0; layer < table.size(0); ++layer) {
    if (type == at::kLong) table.data_ptr<int64_t>()[layer * table.size(1) + slot] = 0;
    else table.data_ptr<float>()[layer * table.size(1) + slot] = 1.f;
  }
}

// Copies one adapter into slot `slot` of the stacked buffers in one call (the Python version makes ~600 small
// torch calls, each a point where the decode thread may wait for the interpreter lock). entries holds
// (target index, layer) per module; a_src[i] [r, in] and b_src[i] [out, r] are contiguous, of the stacks'
// dtype or (into float32 stacks) bfloat16 / float16, kept as saved with b's scaling b_scales[i] beside it.
// Every target's rank, storage and scale for this slot are reset first, then set for the modules given.
void slot_write(const std::vector<at::Tensor>& a_stacks, const std::vector<at::Tensor>& b_stacks,
                const std::vector<at::Tensor>& rank_tables, const std::vector<at::Tensor>& stored_tables,
                const std::vector<at::Tensor>& scale_tables, int64_t slot, const std::vector<int64_t>& entries,
                const std::vector<at::Tensor>& a_src, const std::vector<at::Tensor>& b_src,
                const std::vector<double>& b_scales) {
  const size_t targets = a_stacks.size();
  TORCH_CHECK(b_stacks.size() == targets && rank_tables.size() == targets && stored_tables.size() == targets &&
                  scale_tables.size() == targets, "one stack and table of each kind per target");
  TORCH_CHECK(entries.size() == 2 * a_src.size() && a_src.size() == b_src.size() && b_src.size() == b_scales.size(),
              "one entry per module");
  for (size_t t = 0; t < targets; ++t) {
    reset_slot(rank_tables[t], slot, at::kLong, "ranks [L, S] int64");
    reset_slot(stored_tables[t], slot, at::kLong, "stored [L, S] int64");
    reset_slot(scale_tables[t], slot, at::kFloat, "b_scale [L, S] float32");
  }
  for (size_t i = 0; i < a_src.size(); ++i) {
    const int64_t t = entries[2 * i], layer = entries[2 * i + 1];
    const at::Tensor &a = a_stacks.at(t), &b = b_stacks.at(t), &sa = a_src[i], &sb = b_src[i];
    const bool same = a.scalar_type() == sa.scalar_type() && b.scalar_type() == sb.scalar_type();
    const bool half = a.scalar_type() == at::kFloat && sb.scalar_type() == sa.scalar_type() &&
                      (sa.scalar_type() == at::kBFloat16 || sa.scalar_type() == at::kHalf);
    TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && sa.is_contiguous() && sb.is_contiguous() &&
                    (same || half), "contiguous tensors of the stacks' dtype, or 16-bit ones into float32 stacks");
    const int64_t slots = a.size(1), max_rank = a.size(2), in = a.size(3), out = b.size(2), r = sa.size(0);
    TORCH_CHECK(slot >= 0 && slot < slots && layer >= 0 && layer < a.size(0) && r <= max_rank &&
                    sa.size(1) == in && sb.size(0) == out && sb.size(1) == r, "module does not fit the slot");
    const int64_t item = a.element_size(), from_item = sa.element_size();
    auto* a_dst = static_cast<char*>(a.data_ptr()) + ((layer * slots + slot) * max_rank) * in * item;
    std::memcpy(a_dst, sa.data_ptr(), r * in * from_item);
    auto* b_dst = static_cast<char*>(b.data_ptr()) + ((layer * slots + slot) * out) * max_rank * item;
    const auto* b_from = static_cast<const char*>(sb.data_ptr());
    if (same) {
      for (int64_t o = 0; o < out; ++o) std::memcpy(b_dst + o * max_rank * item, b_from + o * r * item, r * item);
    } else {
      std::memcpy(b_dst, b_from, out * r * from_item);     // packed [out, r], widened by the ops
      stored_tables[t].data_ptr<int64_t>()[layer * slots + slot] =
          sa.scalar_type() == at::kBFloat16 ? kBFloat16 : kFloat16;
      scale_tables[t].data_ptr<float>()[layer * slots + slot] = static_cast<float>(b_scales[i]);
    }
    rank_tables[t].data_ptr<int64_t>()[layer * slots + slot] = r;
  }
}

// [a_0, b_0, a_1, b_1, ...]: views of consecutive pieces of `flat`, shapes [r, in] and [out, r] from dims
// (r, in, out per module): one call instead of two Python view calls per module.
std::vector<at::Tensor> split_views(const at::Tensor& flat, const std::vector<int64_t>& dims) {
  TORCH_CHECK(flat.dim() == 1 && dims.size() % 3 == 0, "flat 1-D, dims (r, in, out) per module");
  std::vector<at::Tensor> views;
  views.reserve(2 * dims.size() / 3);
  int64_t offset = 0;
  for (size_t i = 0; i < dims.size(); i += 3) {
    const int64_t r = dims[i], in = dims[i + 1], out = dims[i + 2];
    TORCH_CHECK(offset + r * in + out * r <= flat.numel(), "dims exceed the buffer");
    views.push_back(flat.narrow(0, offset, r * in).view({r, in}));
    offset += r * in;
    views.push_back(flat.narrow(0, offset, out * r).view({out, r}));
    offset += out * r;
  }
  return views;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("slot_write(Tensor[] a_stacks, Tensor[] b_stacks, Tensor[] rank_tables, Tensor[] stored_tables, "
        "Tensor[] scale_tables, int slot, int[] entries, Tensor[] a_src, Tensor[] b_src, float[] b_scales) -> ()",
        &slot_write);
  m.def("split_views(Tensor flat, int[] dims) -> Tensor[]", &split_views);
  m.def("use_one_thread() -> ()", &use_one_thread);
}
