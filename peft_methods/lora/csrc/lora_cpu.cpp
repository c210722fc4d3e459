// Multi-adapter LoRA shrink and expand for a few rows per adapter, fp32, AVX-512.
//
// Decode batches give each adapter 1..8 rows. A GEMM library spends that
// case packing operands and streams the adapter weights at a fraction of the
// memory bandwidth; here each weight row is read once and used for every row
// of its segment while the partial results stay in registers.
//
//   shrink: h[s] = x[start_s:end_s] @ a[s]^T          a[s]: [R_s, in] row-major
//   expand: y[start_s:end_s] += scale_s * h[s][:, c_s:c_s + r_s] @ b[s]^T
// `lora_shrink` takes its weights per call (the vocabulary projection uses it);
// `LoRAGroup` holds adapter slots' weights in the kernel's layouts and applies
// a batch's segments from a plan table.
// Work is split over (segment, block of weight rows or output columns) and run
// with at::parallel_for, so it uses the same threads as torch's own ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#ifndef __AVX512F__
#error "lora_cpu.cpp needs AVX-512 (built with -march=native on an AVX-512 CPU)"
#endif

namespace {

constexpr int64_t kLanes = 16;          // floats per AVX-512 register
constexpr int64_t kRowTile = 4;         // activation rows held in registers at once
constexpr int64_t kShrinkItemRows = 8;  // weight rows of A per work item
constexpr int64_t kExpandTile = 64;     // output columns held in registers (4 registers)
constexpr int64_t kExpandItemCols = 256;

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// out[r * ldo + j] = dot(a_j, x[r]) for r < N, j < 4: four weight rows share each load of x,
// so 16 accumulators are live and every x load feeds 4 FMAs.
template <int N>
inline void dot_four_rows(const float* const* a, const float* x, int64_t ldx, int64_t len, float* out,
                          int64_t ldo) {
  __m512 acc[N][4];
  for (int r = 0; r < N; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += kLanes) {
    const __mmask16 mask = tail_mask(len - i);
    __m512 va[4];
    for (int j = 0; j < 4; ++j) va[j] = _mm512_maskz_loadu_ps(mask, a[j] + i);
    for (int r = 0; r < N; ++r) {
      const __m512 vx = _mm512_maskz_loadu_ps(mask, x + r * ldx + i);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(va[j], vx, acc[r][j]);
    }
  }
  for (int r = 0; r < N; ++r)
    for (int j = 0; j < 4; ++j) out[r * ldo + j] = _mm512_reduce_add_ps(acc[r][j]);
}

// h[i * ldh + k] = dot(a[k], x[i]) for k < num_a_rows, i < n.
void shrink_block(const float* a, int64_t num_a_rows, const float* x, int64_t ldx, int64_t n, int64_t len, float* h,
                  int64_t ldh) {
  float block[kRowTile * 4];
  for (int64_t k = 0; k < num_a_rows; k += 4) {
    const int64_t live = std::min<int64_t>(4, num_a_rows - k);
    const float* rows[4];
    for (int64_t j = 0; j < 4; ++j) rows[j] = a + (k + std::min(j, live - 1)) * len;  // tail: repeat, store live only
    for (int64_t i = 0; i < n; i += kRowTile) {
      const int64_t m = std::min(kRowTile, n - i);
      const float* xi = x + i * ldx;
      switch (m) {
        case 4: dot_four_rows<4>(rows, xi, ldx, len, block, 4); break;
        case 3: dot_four_rows<3>(rows, xi, ldx, len, block, 4); break;
        case 2: dot_four_rows<2>(rows, xi, ldx, len, block, 4); break;
        default: dot_four_rows<1>(rows, xi, ldx, len, block, 4); break;
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < live; ++j) h[(i + r) * ldh + k + j] = block[r * 4 + j];
    }
  }
}

// y[r, 0:cols] += sum_k scale * h[r * ldh + k] * b[k * ldb + 0:cols] for r < N, cols <= 64.
template <int N>
inline void expand_tile(const float* b, int64_t ldb, int64_t rank, const float* h, int64_t ldh, float scale, float* y,
                        int64_t ldy, int64_t cols) {
  __mmask16 mask[4];
  for (int c = 0; c < 4; ++c) mask[c] = cols > 16 * c ? tail_mask(cols - 16 * c) : static_cast<__mmask16>(0);
  __m512 acc[N][4];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_maskz_loadu_ps(mask[c], y + r * ldy + 16 * c);
  for (int64_t k = 0; k < rank; ++k) {
    const float* bk = b + k * ldb;
    __m512 vb[4];
    for (int c = 0; c < 4; ++c) vb[c] = _mm512_maskz_loadu_ps(mask[c], bk + 16 * c);
    for (int r = 0; r < N; ++r) {
      const __m512 coef = _mm512_set1_ps(scale * h[r * ldh + k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(coef, vb[c], acc[r][c]);
    }
  }
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(y + r * ldy + 16 * c, mask[c], acc[r][c]);
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

}  // namespace

// Returns h[s] = x[starts[s]:ends[s]] @ a[s]^T, one [n_s, R_s] tensor per segment.
std::vector<at::Tensor> lora_shrink(const at::Tensor& x, const std::vector<int64_t>& starts,
                                    const std::vector<int64_t>& ends, const std::vector<at::Tensor>& a) {
  check_matrix(x, "x");
  const int64_t num_segments = static_cast<int64_t>(starts.size());
  TORCH_CHECK(ends.size() == starts.size() && a.size() == starts.size(), "one start, end and A per segment");
  const int64_t in = x.size(1), ldx = x.stride(0);
  std::vector<at::Tensor> h(num_segments);
  std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first A row)
  for (int64_t s = 0; s < num_segments; ++s) {
    check_matrix(a[s], "A");
    TORCH_CHECK(a[s].size(1) == in && a[s].is_contiguous(), "A must be contiguous [R, in]");
    TORCH_CHECK(0 <= starts[s] && starts[s] < ends[s] && ends[s] <= x.size(0), "bad segment");
    h[s] = at::empty({ends[s] - starts[s], a[s].size(0)}, x.options());
    for (int64_t k = 0; k < a[s].size(0); k += kShrinkItemRows) items.emplace_back(s, k);
  }
  const float* x_data = x.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [s, k0] = items[item];
      const int64_t rank = a[s].size(0);
      const int64_t k1 = std::min(rank, k0 + kShrinkItemRows);
      shrink_block(a[s].data_ptr<float>() + k0 * in, k1 - k0, x_data + starts[s] * ldx, ldx, ends[s] - starts[s],
                   in, h[s].data_ptr<float>() + k0, rank);
    }
  });
  return h;
}

// Sibling LoRA layers that read one input (q/k/v, gate/up, or one layer alone), with each adapter
// slot's weights kept in the layouts the kernels read fastest, so that a forward's call passes
// only the activations and the batch's plan:
//   a[slot]           [R, in] the members' A matrices stacked (held, not copied: shared with Python)
//   columns[slot][m]  first row of member m's A in a[slot], -1 where m has none in this slot
//   blocked[slot][m]  member m's B^T [r, out] as [ceil(out / 64), r, 64], zero-padded: each
//                     64-column tile of every rank row is one contiguous run, so the expand
//                     streams it; row-major B^T makes it jump a whole output row per rank row
// A plan is an int64 [S, 3] tensor of (slot, start, end) segments of the input's rows; `shrink`
// returns the h of every segment whose slot is loaded, packed in one flat tensor in plan order
// ([rows, R] each), and `expand` adds one member's part of it to that member's output.
class LoRAGroup {
 public:
  LoRAGroup(int64_t in_features, std::vector<int64_t> out_features, int64_t num_slots)
      : in_(in_features), outs_(std::move(out_features)), a_(num_slots), columns_(num_slots),
        blocked_(num_slots), scales_(num_slots) {
    TORCH_CHECK(in_ > 0 && !outs_.empty() && num_slots > 0, "a LoRA group needs inputs, members and slots");
  }

  void set_slot(int64_t slot, const at::Tensor& a, const std::vector<int64_t>& columns,
                const std::vector<std::optional<at::Tensor>>& bt, const std::vector<double>& scales) {
    check_slot(slot);
    const int64_t members = static_cast<int64_t>(outs_.size());
    TORCH_CHECK(static_cast<int64_t>(columns.size()) == members && static_cast<int64_t>(bt.size()) == members &&
                    static_cast<int64_t>(scales.size()) == members,
                "one column, B^T and scale per member");
    check_matrix(a, "A");
    TORCH_CHECK(a.size(1) == in_ && a.is_contiguous(), "A must be contiguous [R, in]");
    std::vector<at::Tensor> blocked(members);
    for (int64_t m = 0; m < members; ++m) {
      if (columns[m] < 0) continue;
      TORCH_CHECK(bt[m].has_value(), "a member with A rows needs its B^T");
      const at::Tensor& b = *bt[m];
      check_matrix(b, "B^T");
      TORCH_CHECK(b.size(1) == outs_[m] && columns[m] + b.size(0) <= a.size(0), "B^T does not fit the member");
      blocked[m] = block_columns(b);
    }
    a_[slot] = a;
    columns_[slot] = columns;
    blocked_[slot] = std::move(blocked);
    scales_[slot].assign(scales.begin(), scales.end());
  }

  void clear_slot(int64_t slot) {
    check_slot(slot);
    a_[slot] = at::Tensor();
    columns_[slot].clear();
    blocked_[slot].clear();
    scales_[slot].clear();
  }

  at::Tensor shrink(const at::Tensor& x, const at::Tensor& plan) const {
    check_matrix(x, "x");
    TORCH_CHECK(x.size(1) == in_, "x has ", x.size(1), " columns, the group's input has ", in_);
    const auto segments = read_plan(plan, x.size(0));
    std::vector<int64_t> offsets;
    const int64_t total = h_offsets(segments, offsets);
    at::Tensor h = at::empty({total}, x.options());
    std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first A row)
    for (size_t i = 0; i < segments.size(); ++i) {
      if (offsets[i] < 0) continue;
      for (int64_t k = 0; k < a_[segments[i].slot].size(0); k += kShrinkItemRows) items.emplace_back(i, k);
    }
    const float* x_data = x.data_ptr<float>();
    float* h_data = h.data_ptr<float>();
    const int64_t ldx = x.stride(0);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const auto [i, k0] = items[item];
        const Segment& seg = segments[i];
        const at::Tensor& a = a_[seg.slot];
        const int64_t rank = a.size(0), k1 = std::min(rank, k0 + kShrinkItemRows);
        shrink_block(a.data_ptr<float>() + k0 * in_, k1 - k0, x_data + seg.start * ldx, ldx, seg.end - seg.start,
                     in_, h_data + offsets[i] + k0, rank);
      }
    });
    return h;
  }

  void expand(int64_t member, at::Tensor& y, const at::Tensor& h, const at::Tensor& plan) const {
    TORCH_CHECK(0 <= member && member < static_cast<int64_t>(outs_.size()), "member ", member, " out of range");
    check_matrix(y, "y");
    const int64_t out = outs_[member];
    TORCH_CHECK(y.size(1) == out, "y has ", y.size(1), " columns, member ", member, " has ", out, " outputs");
    const auto segments = read_plan(plan, y.size(0));
    std::vector<int64_t> offsets;
    TORCH_CHECK(h.is_contiguous() && h.scalar_type() == at::kFloat && h.numel() == h_offsets(segments, offsets),
                "h is not this group's shrink of this plan");
    const int64_t num_tiles = (out + kExpandTile - 1) / kExpandTile;
    constexpr int64_t kTilesPerItem = kExpandItemCols / kExpandTile;
    std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first column tile)
    for (size_t i = 0; i < segments.size(); ++i) {
      if (offsets[i] < 0 || columns_[segments[i].slot][member] < 0) continue;
      for (int64_t t = 0; t < num_tiles; t += kTilesPerItem) items.emplace_back(i, t);
    }
    float* y_data = y.data_ptr<float>();
    const float* h_data = h.data_ptr<float>();
    const int64_t ldy = y.stride(0);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const auto [i, t0] = items[item];
        const Segment& seg = segments[i];
        const at::Tensor& blocked = blocked_[seg.slot][member];
        const int64_t rank = blocked.size(1), ldh = a_[seg.slot].size(0), n = seg.end - seg.start;
        const float* hs = h_data + offsets[i] + columns_[seg.slot][member];
        const float scale = static_cast<float>(scales_[seg.slot][member]);
        for (int64_t t = t0; t < std::min(num_tiles, t0 + kTilesPerItem); ++t) {
          const float* b = blocked.data_ptr<float>() + t * rank * kExpandTile;
          const int64_t c = t * kExpandTile, cols = std::min(kExpandTile, out - c);
          for (int64_t r = 0; r < n; r += kRowTile) {
            float* yt = y_data + (seg.start + r) * ldy + c;
            const float* ht = hs + r * ldh;
            switch (std::min(kRowTile, n - r)) {
              case 4: expand_tile<4>(b, kExpandTile, rank, ht, ldh, scale, yt, ldy, cols); break;
              case 3: expand_tile<3>(b, kExpandTile, rank, ht, ldh, scale, yt, ldy, cols); break;
              case 2: expand_tile<2>(b, kExpandTile, rank, ht, ldh, scale, yt, ldy, cols); break;
              default: expand_tile<1>(b, kExpandTile, rank, ht, ldh, scale, yt, ldy, cols); break;
            }
          }
        }
      }
    });
  }

 private:
  struct Segment {
    int64_t slot, start, end;
  };

  void check_slot(int64_t slot) const {
    TORCH_CHECK(0 <= slot && slot < static_cast<int64_t>(a_.size()), "slot ", slot, " out of range");
  }

  std::vector<Segment> read_plan(const at::Tensor& plan, int64_t num_rows) const {
    TORCH_CHECK(plan.device().is_cpu() && plan.scalar_type() == at::kLong && plan.dim() == 2 && plan.size(1) == 3 &&
                    plan.is_contiguous(),
                "plan must be a contiguous int64 [S, 3] tensor of (slot, start, end)");
    const int64_t* p = plan.data_ptr<int64_t>();
    std::vector<Segment> segments(plan.size(0));
    for (int64_t i = 0; i < plan.size(0); ++i) {
      segments[i] = {p[3 * i], p[3 * i + 1], p[3 * i + 2]};
      check_slot(segments[i].slot);
      TORCH_CHECK(0 <= segments[i].start && segments[i].start < segments[i].end && segments[i].end <= num_rows,
                  "bad segment (", segments[i].slot, ", ", segments[i].start, ", ", segments[i].end, ") of ",
                  num_rows, " rows");
    }
    return segments;
  }

  // Each segment's offset in h (-1 where its slot is empty); returns h's size.
  int64_t h_offsets(const std::vector<Segment>& segments, std::vector<int64_t>& offsets) const {
    offsets.assign(segments.size(), -1);
    int64_t total = 0;
    for (size_t i = 0; i < segments.size(); ++i) {
      const at::Tensor& a = a_[segments[i].slot];
      if (!a.defined()) continue;
      offsets[i] = total;
      total += (segments[i].end - segments[i].start) * a.size(0);
    }
    return total;
  }

  static at::Tensor block_columns(const at::Tensor& bt) {
    const int64_t rank = bt.size(0), out = bt.size(1);
    const int64_t num_tiles = (out + kExpandTile - 1) / kExpandTile;
    at::Tensor padded = at::zeros({rank, num_tiles * kExpandTile}, bt.options());
    padded.narrow(1, 0, out).copy_(bt);
    return padded.view({rank, num_tiles, kExpandTile}).transpose(0, 1).contiguous();
  }

  int64_t in_;
  std::vector<int64_t> outs_;
  std::vector<at::Tensor> a_;
  std::vector<std::vector<int64_t>> columns_;
  std::vector<std::vector<at::Tensor>> blocked_;
  std::vector<std::vector<double>> scales_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shrink", &lora_shrink, "h[s] = x[start:end] @ a[s]^T per segment");
  pybind11::class_<LoRAGroup>(m, "LoRAGroup")
      .def(pybind11::init<int64_t, std::vector<int64_t>, int64_t>(), pybind11::arg("in_features"),
           pybind11::arg("out_features"), pybind11::arg("num_slots"))
      .def("set_slot", &LoRAGroup::set_slot, "hold a slot's stacked A and each member's B^T, blocked")
      .def("clear_slot", &LoRAGroup::clear_slot)
      .def("shrink", &LoRAGroup::shrink, "h of every loaded plan segment, flat, in plan order")
      .def("expand", &LoRAGroup::expand, "y += one member's LoRA delta over the plan's segments, in place");
}
