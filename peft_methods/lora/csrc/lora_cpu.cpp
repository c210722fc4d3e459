// Multi-adapter LoRA shrink and expand for a few rows per adapter, fp32, AVX-512.
//
// Decode batches give each adapter 1..8 rows. A GEMM library spends that
// case packing operands and streams the adapter weights at a fraction of the
// memory bandwidth; here each weight row is read once and used for every row
// of its segment while the partial results stay in registers.
//
//   shrink: h[s] = x[start_s:end_s] @ a[s]^T          a[s]: [R_s, in] row-major
//   expand: y[start_s:end_s] += scale_s * h[s][:, c_s:c_s + r_s] @ bt[s]
//                                                     bt[s]: [r_s, out] row-major
// Work is split over (segment, block of weight rows or output columns) and run
// with at::parallel_for, so it uses the same threads as torch's own ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
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

// y[starts[s]:ends[s]] += scales[s] * h[s][:, columns[s]:columns[s] + r_s] @ bt[s], in place.
void lora_expand(at::Tensor& y, const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
                 const std::vector<at::Tensor>& h, const std::vector<int64_t>& columns,
                 const std::vector<at::Tensor>& bt, const std::vector<double>& scales) {
  check_matrix(y, "y");
  const int64_t num_segments = static_cast<int64_t>(starts.size());
  TORCH_CHECK(ends.size() == starts.size() && h.size() == starts.size() && columns.size() == starts.size() &&
                  bt.size() == starts.size() && scales.size() == starts.size(),
              "one start, end, h, column, B^T and scale per segment");
  const int64_t out = y.size(1), ldy = y.stride(0);
  std::vector<std::pair<int64_t, int64_t>> items;  // (segment, first output column)
  for (int64_t s = 0; s < num_segments; ++s) {
    check_matrix(h[s], "h");
    check_matrix(bt[s], "B^T");
    TORCH_CHECK(bt[s].size(1) == out && bt[s].is_contiguous(), "B^T must be contiguous [r, out]");
    TORCH_CHECK(0 <= starts[s] && starts[s] < ends[s] && ends[s] <= y.size(0), "bad segment");
    TORCH_CHECK(h[s].size(0) == ends[s] - starts[s] && columns[s] + bt[s].size(0) <= h[s].size(1),
                "h does not cover the segment's rows and rank columns");
    for (int64_t c = 0; c < out; c += kExpandItemCols) items.emplace_back(s, c);
  }
  float* y_data = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [s, c_begin] = items[item];
      const int64_t c_end = std::min(out, c_begin + kExpandItemCols);
      const int64_t rank = bt[s].size(0), n = ends[s] - starts[s], ldh = h[s].stride(0);
      const float* b = bt[s].data_ptr<float>();
      const float* hs = h[s].data_ptr<float>() + columns[s];
      const float scale = static_cast<float>(scales[s]);
      for (int64_t c = c_begin; c < c_end; c += kExpandTile) {
        const int64_t cols = std::min(kExpandTile, c_end - c);
        for (int64_t i = 0; i < n; i += kRowTile) {
          const int64_t rows = std::min(kRowTile, n - i);
          float* yt = y_data + (starts[s] + i) * ldy + c;
          const float* ht = hs + i * ldh;
          switch (rows) {
            case 4: expand_tile<4>(b + c, out, rank, ht, ldh, scale, yt, ldy, cols); break;
            case 3: expand_tile<3>(b + c, out, rank, ht, ldh, scale, yt, ldy, cols); break;
            case 2: expand_tile<2>(b + c, out, rank, ht, ldh, scale, yt, ldy, cols); break;
            default: expand_tile<1>(b + c, out, rank, ht, ldh, scale, yt, ldy, cols); break;
          }
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_shrink", &lora_shrink, "h[s] = x[start:end] @ a[s]^T per segment");
  m.def("lora_expand", &lora_expand, "y[start:end] += scale * h[s][:, c:c+r] @ bt[s] per segment, in place");
}
