// Decode attention over a paged KV cache, every decoding sequence of a layer in one call, fp32, AVX-512.
//
// A decode has one query row per head and a few hundred cached keys. Attending
// it through SDPA costs one call per sequence and layer (about 55 us each on 2
// cores, mostly fixed cost), several times the arithmetic. Here one call covers
// all decodes of the iteration: work items are (sequence, KV head), and the
// query heads that share a KV head (GQA) read each cached key and value once.
//
//   for b < B, h < H, with g = h / (H / KVH) and keys p in [lo_b, len_b):
//     s_p = scale * q[rows[b], h] . K[slot_b(p), g]
//     out[rows[b], h] = sum_p softmax(s)_p * V[slot_b(p), g]
//   slot_b(p) = block_tables[b][p / block_size] * block_size + p % block_size
//   lo_b = max(0, len_b - sliding_window) with a window, else 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifndef __AVX512F__
#error "decode_attention_cpu.cpp needs AVX-512 (built with -march=native on an AVX-512 CPU)"
#endif

namespace {

constexpr int64_t kLanes = 16;

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

inline float dot(const float* a, const float* b, int64_t len) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += kLanes) {
    const __mmask16 mask = tail_mask(len - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// exp of 16 lanes, x <= 0 (scores minus their maximum): Cephes' expf polynomial on x - n ln 2,
// scaled by 2^n with scalef: within 1.3 ulp of the exact value over [-87, 0] (its float32 model, checked at 2M points),
// and 0 below -87.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// w[0:n] = exp(w[0:n] - best) in place; returns their sum.
inline float exp_and_sum(float* w, int64_t n, float best) {
  const __m512 shift = _mm512_set1_ps(best);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, w + i), shift));
    _mm512_mask_storeu_ps(w + i, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// Where the cache holds key position p of a sequence.
struct Slots {
  const int64_t* table;
  int64_t block_size;
  int64_t operator()(int64_t p) const { return table[p / block_size] * block_size + p % block_size; }
};

// One (sequence, KV head) item for G query heads of head_dim 16 * DV: the queries and the G x DV
// output accumulators stay in registers while the keys, then the values, stream past once.
template <int DV, int G>
void attend_in_registers(const float* q_rows, const float* keys, const float* values, Slots slot_of,
                         int64_t row_stride, int64_t lo, int64_t len, float scale, float* scores, float* out) {
  constexpr int64_t kDim = DV * kLanes;
  const int64_t n = len - lo;
  __m512 q[G][DV];
  for (int j = 0; j < G; ++j)
    for (int v = 0; v < DV; ++v) q[j][v] = _mm512_mul_ps(_mm512_loadu_ps(q_rows + j * kDim + v * kLanes), _mm512_set1_ps(scale));
  float best[G];
  for (int j = 0; j < G; ++j) best[j] = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float* key = keys + slot_of(lo + i) * row_stride;
    __m512 k[DV];
    for (int v = 0; v < DV; ++v) k[v] = _mm512_loadu_ps(key + v * kLanes);
    for (int j = 0; j < G; ++j) {
      __m512 acc = _mm512_mul_ps(q[j][0], k[0]);
      for (int v = 1; v < DV; ++v) acc = _mm512_fmadd_ps(q[j][v], k[v], acc);
      const float s = _mm512_reduce_add_ps(acc);
      scores[j * n + i] = s;
      best[j] = std::max(best[j], s);
    }
  }
  float inverse[G];
  for (int j = 0; j < G; ++j) inverse[j] = 1.0f / exp_and_sum(scores + j * n, n, best[j]);
  __m512 acc[G][DV];
  for (int j = 0; j < G; ++j)
    for (int v = 0; v < DV; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const float* value = values + slot_of(lo + i) * row_stride;
    __m512 x[DV];
    for (int v = 0; v < DV; ++v) x[v] = _mm512_loadu_ps(value + v * kLanes);
    for (int j = 0; j < G; ++j) {
      const __m512 w = _mm512_set1_ps(scores[j * n + i]);
      for (int v = 0; v < DV; ++v) acc[j][v] = _mm512_fmadd_ps(w, x[v], acc[j][v]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int v = 0; v < DV; ++v)
      _mm512_storeu_ps(out + j * kDim + v * kLanes, _mm512_mul_ps(acc[j][v], _mm512_set1_ps(inverse[j])));
}

// The same for any head_dim and group size, the output accumulated in memory.
void attend_any_shape(const float* q_rows, const float* keys, const float* values, Slots slot_of,
                      int64_t row_stride, int64_t group, int64_t head_dim, int64_t lo, int64_t len, float scale,
                      float* scores, float* out) {
  const int64_t n = len - lo;
  for (int64_t j = 0; j < group; ++j) {
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      const float s = scale * dot(q_rows + j * head_dim, keys + slot_of(lo + i) * row_stride, head_dim);
      scores[j * n + i] = s;
      best = std::max(best, s);
    }
    const float inverse = 1.0f / exp_and_sum(scores + j * n, n, best);
    float* o = out + j * head_dim;
    std::fill(o, o + head_dim, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 w = _mm512_set1_ps(scores[j * n + i]);
      const float* value = values + slot_of(lo + i) * row_stride;
      for (int64_t d = 0; d < head_dim; d += kLanes) {
        const __mmask16 mask = tail_mask(head_dim - d);
        _mm512_mask_storeu_ps(o + d, mask, _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, value + d),
                                                           _mm512_maskz_loadu_ps(mask, o + d)));
      }
    }
    for (int64_t d = 0; d < head_dim; ++d) o[d] *= inverse;
  }
}

using InRegisters = void (*)(const float*, const float*, const float*, Slots, int64_t, int64_t, int64_t, float,
                             float*, float*);

// The register-resident variant for this head_dim and group size, or nullptr.
InRegisters in_registers_for(int64_t head_dim, int64_t group) {
#define COSERVE_CASE(DV, G) \
  if (head_dim == (DV) * kLanes && group == (G)) return &attend_in_registers<DV, G>;
  COSERVE_CASE(4, 1) COSERVE_CASE(4, 2) COSERVE_CASE(4, 4)
  COSERVE_CASE(8, 1) COSERVE_CASE(8, 2) COSERVE_CASE(8, 4)
#undef COSERVE_CASE
  return nullptr;
}

void check_cache(const torch::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == torch::kFloat32 && cache.dim() == 4 &&
                  cache.is_contiguous(),
              name, " must be a contiguous fp32 CPU tensor [num_blocks, block_size, kv_heads, head_dim]");
}

}  // namespace

// q, out: [T, H, D]; key_cache, value_cache: [num_blocks, block_size, KVH, D]; rows: [B];
// block_tables: [B, max_blocks]; context_lens: [B]; sliding_window <= 0 means none.
void decode_attention(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                      const torch::Tensor& rows, const torch::Tensor& block_tables,
                      const torch::Tensor& context_lens, int64_t sliding_window, double scale, torch::Tensor out) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(),
              "q must be a contiguous fp32 CPU tensor [tokens, heads, head_dim]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == torch::kFloat32 && out.is_contiguous(),
              "out must be a contiguous fp32 tensor shaped like q");
  check_cache(key_cache, "key_cache");
  check_cache(value_cache, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "key_cache and value_cache must have one shape");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && block_tables.scalar_type() == torch::kLong &&
                  context_lens.scalar_type() == torch::kLong && rows.is_contiguous() &&
                  block_tables.is_contiguous() && context_lens.is_contiguous() && block_tables.dim() == 2,
              "rows, block_tables and context_lens must be contiguous long tensors");
  const int64_t num_seqs = rows.size(0);
  TORCH_CHECK(block_tables.size(0) == num_seqs && context_lens.size(0) == num_seqs,
              "rows, block_tables and context_lens must cover the same sequences");
  const int64_t num_tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1), kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == head_dim, "the cache's head_dim differs from q's");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(0 <= row_of[b] && row_of[b] < num_tokens, "a decode row is outside q");
    TORCH_CHECK(0 < lens[b] && lens[b] <= max_blocks * block_size, "a context length exceeds its block table");
    for (int64_t k = 0; k < (lens[b] + block_size - 1) / block_size; ++k)
      TORCH_CHECK(0 <= tables[b * max_blocks + k] && tables[b * max_blocks + k] < num_blocks,
                  "a block id is outside the cache");
  }
  const float* q_data = q.data_ptr<float>();
  const float* keys = key_cache.data_ptr<float>();
  const float* values = value_cache.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  const InRegisters fast = in_registers_for(head_dim, group);
  const int64_t row_stride = kv_heads * head_dim;   // between consecutive cache slots
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, g = item % kv_heads;
      const int64_t len = lens[b];
      const int64_t lo = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      scores.resize(group * (len - lo));
      const Slots slot_of{tables + b * max_blocks, block_size};
      const int64_t first_head = row_of[b] * heads + g * group;   // the group's query heads share KV head g
      const float* q_rows = q_data + first_head * head_dim;
      float* o = out_data + first_head * head_dim;
      const float* k = keys + g * head_dim;
      const float* v = values + g * head_dim;
      if (fast != nullptr)
        fast(q_rows, k, v, slot_of, row_stride, lo, len, scale_f, scores.data(), o);
      else
        attend_any_shape(q_rows, k, v, slot_of, row_stride, group, head_dim, lo, len, scale_f, scores.data(), o);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "out[rows[b]] = attention of q[rows[b]] over sequence b's cached keys and values, in place");
}
