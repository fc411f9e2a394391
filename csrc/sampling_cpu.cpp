// CPU implementation of torch.ops.erpo_fast.sample_tokens and sample_tokens_rowseed: per-row-temperature
// sampling with top-k / top-p.
//
// Semantics (identical to kernels/sampling/naive.py): temperature, then top-k (keep logits >= the k-th largest),
// then top-p (keep logits whose strictly-larger mass is < top_p), renormalise, sample; temperature 0 is greedy
// (first argmax, log-prob 0). Rows with NaN/+inf logits or no finite logit get a NaN log-prob (Python raises).
//
// Unfiltered rows: one pass over the vocabulary in fixed 2048-column chunks (parallel over (row, chunk)). Each
// chunk computes its max, sum exp(s - max) and its exponential-race winner argmax exp(s - max) / E with
// E = -log(u) ~ Exp(1) (Gumbel-max in the exp domain, so the exp needed for the logsumexp is reused). Chunk
// states merge in a fixed order, so results do not depend on the thread count.
// Filtered rows (parallel over rows): selection finds the per-row logit threshold without a full sort: a
// size-k min-heap (or nth_element) for top-k; for top-p a histogram of the probability mass by binary exponent
// narrows the candidates to the bin where the cumulative mass crosses top_p, then a mass-weighted quickselect
// finds the exact threshold. Gumbel-max over the kept tokens (a short list, or the vectorised chunk pass with
// the threshold when many are kept) gives the sample and the renormalised log-prob.
//
// Noise: row r's stream is keyed by row_key(seed, r) for sample_tokens, and by row_key(seeds[r], 0) for
// sample_tokens_rowseed (one seed per row, so a row's token does not depend on its index or the batch).
// Same seed -> same tokens on the same machine; the AVX-512 / AVX2 / baseline builds of the hot loops may
// round differently, so tokens can differ across CPU types in rare near-ties.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "sampling_common.h"

namespace erpo_fast {
namespace sampling {
namespace {

constexpr int64_t kChunk = 2048;
constexpr int64_t kHeapMaxK = 512;  // above this, nth_element on a copy beats a heap
constexpr float kInf = std::numeric_limits<float>::infinity();

// Hot loops are compiled for AVX-512 / AVX2 too and picked at load time by CPU feature, so the cached build stays
// portable. (They vectorise only with -fno-trapping-math, which lets GCC if-convert the branch-free selects.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ERPO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ERPO_CLONES
#endif

ERPO_HD float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
ERPO_HD uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// expf for x <= 88 (Cephes polynomial, ~1 ulp), branch-free so the chunk loops vectorise; exactly 0 below -87.
ERPO_HD float exp_approx(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // adding 1.5 * 2^23 rounds to an integer
  const float n = t - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t) - 0x4B400000U);
  const float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < -87.0f ? 0.0f : y;
}

// logf for normal positive x (Cephes polynomial), branch-free.
ERPO_HD float log_approx(float x) {
  const uint32_t i = float_to_bits(x);
  int32_t e = static_cast<int32_t>((i >> 23) & 0xFF) - 126;
  float m = bits_to_float((i & 0x007FFFFFU) | 0x3F000000U);  // x = m * 2^e, m in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float ef = static_cast<float>(e);
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + ef * 0.693359375f;
}

struct ChunkState {
  float m = -kInf;     // max scaled logit of kept tokens (greedy: max logit)
  float sum = 0.0f;    // sum of exp(s - m)
  float best = -kInf;  // winner's Gumbel key s + G
  int64_t idx = -1;
  bool bad = false;    // NaN or +inf seen
};

// Max of z over z >= thr, and whether a NaN/+inf is present, over a row or a chunk.
ERPO_CLONES void masked_max(const float* z, int64_t n, float thr, float& out_max, bool& out_bad) {
  float zmax = -kInf;
  int32_t bad = 0;
#pragma omp simd reduction(max : zmax) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = z[i];
    bad |= static_cast<int32_t>((v != v) | (v == kInf));
    const float w = v >= thr ? v : -kInf;
    zmax = w > zmax ? w : zmax;
  }
  out_max = zmax;
  out_bad = bad != 0;
}

// Sampling pass over one chunk at inverse temperature inv_t, over tokens with logit >= thr; `keys` is scratch
// of kChunk floats.
ERPO_CLONES void sample_chunk(const float* z, int64_t n, uint32_t col0, float inv_t, float thr, RowKey key,
                              ChunkState& st, float* keys) {
  float zmax;
  masked_max(z, n, thr, zmax, st.bad);
  if (zmax == -kInf) return;  // nothing here can be sampled
  const float m = zmax * inv_t;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float x = exp_approx(z[i] * inv_t - m);
    const float e = z[i] >= thr ? x : 0.0f;
    sum += e;
    keys[i] = e / -log_approx(uniform01(key, col0 + static_cast<uint32_t>(i)));
  }
  float kmax = 0.0f;
#pragma omp simd reduction(max : kmax)
  for (int64_t i = 0; i < n; ++i) kmax = keys[i] > kmax ? keys[i] : kmax;
  int64_t at = 0;
  while (keys[at] != kmax) ++at;  // first winner; kmax > 0 because the max token has e = 1
  st.m = m;
  st.sum = sum;
  st.best = m + std::log(kmax);
  st.idx = col0 + at;
}

// Greedy pass over one chunk: first argmax.
ERPO_CLONES void greedy_chunk(const float* z, int64_t n, int64_t col0, ChunkState& st) {
  float zmax = -kInf;
  int32_t bad = 0;
#pragma omp simd reduction(max : zmax) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = z[i];
    bad |= static_cast<int32_t>((v != v) | (v == kInf));
    zmax = v > zmax ? v : zmax;
  }
  int64_t at = 0;
  while (at < n && z[at] != zmax) ++at;
  st.m = zmax;
  st.idx = col0 + (at < n ? at : 0);
  st.bad = bad != 0;
}

// out[i] = exp(z[i] * inv_t - m) where z[i] >= thr, else 0.
ERPO_CLONES void masked_exp(const float* z, int64_t n, float thr, float inv_t, float m, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_approx(z[i] * inv_t - m);
    out[i] = z[i] >= thr ? e : 0.0f;
  }
}

// Merge chunk states in chunk order (so the result is thread-count independent) -> (token, log-prob).
// `z_of(idx)` returns the token's logit. Greedy rows use the chunk maxima and get log-prob 0.
template <typename ZOf>
std::pair<int64_t, float> merge_chunks(const ChunkState* st, int64_t n_chunks, bool greedy, float inv_t, ZOf z_of) {
  bool bad = false;
  float m = -kInf, best = -kInf;
  int64_t idx = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    bad |= st[c].bad;
    m = std::max(m, st[c].m);
    const float key = greedy ? st[c].m : st[c].best;
    if (key > best) {
      best = key;
      idx = st[c].idx;
    }
  }
  if (bad || m == -kInf) return {idx, std::numeric_limits<float>::quiet_NaN()};
  if (greedy) return {idx, 0.0f};
  double sum = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (st[c].m > -kInf) sum += static_cast<double>(st[c].sum) * std::exp(static_cast<double>(st[c].m - m));
  }
  return {idx, z_of(idx) * inv_t - (m + static_cast<float>(std::log(sum)))};
}

struct Cand {
  float z;
  float p;
  int64_t idx;
};

// k-th largest logit (NaN counts as -inf), with a size-k min-heap for small k, else nth_element on a copy.
float kth_largest(const float* z, int64_t V, int64_t k, std::vector<float>& scratch) {
  auto clean = [](float v) { return v != v ? -kInf : v; };
  if (k <= kHeapMaxK) {
    scratch.resize(k);
    for (int64_t i = 0; i < k; ++i) scratch[i] = clean(z[i]);
    std::make_heap(scratch.begin(), scratch.end(), std::greater<float>());
    for (int64_t i = k; i < V; ++i) {
      const float v = z[i];
      if (v > scratch[0]) {  // false for NaN
        std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
        scratch.back() = v;
        std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
      }
    }
    return scratch[0];
  }
  scratch.resize(V);
  for (int64_t i = 0; i < V; ++i) scratch[i] = clean(z[i]);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  return scratch[k - 1];
}

// Smallest candidate logit tau whose strictly-larger mass is < top_p (mass-weighted quickselect, expected O(n)).
// The candidates must include every token above the answer; they are permuted in place.
float top_p_threshold(Cand* c, int64_t n, double top_p) {
  double above = 0.0;  // mass of candidates larger than everything in [lo, hi)
  float tau = kInf;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    float a = c[lo].z, b = c[lo + (hi - lo) / 2].z, d = c[hi - 1].z;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));  // median of three
    int64_t gt = lo, i = lo, lt = hi;  // [lo, gt) > pivot, [gt, lt) == pivot, [lt, hi) < pivot
    while (i < lt) {
      if (c[i].z > pivot) {
        std::swap(c[i++], c[gt++]);
      } else if (c[i].z < pivot) {
        std::swap(c[i], c[--lt]);
      } else {
        ++i;
      }
    }
    double greater = 0.0, equal = 0.0;
    for (int64_t j = lo; j < gt; ++j) greater += c[j].p;
    for (int64_t j = gt; j < lt; ++j) equal += c[j].p;
    if (above + greater < top_p) {  // the pivot is kept: the answer is the pivot or smaller
      tau = pivot;
      above += greater + equal;
      lo = lt;
    } else {
      hi = gt;
    }
  }
  return tau;
}

// Gumbel-max over an explicit kept list; returns (token, log-prob under the renormalised kept distribution).
std::pair<int64_t, float> sample_list(const std::vector<Cand>& kept, float inv_t, RowKey key) {
  float m = -kInf;
  for (const Cand& c : kept) m = std::max(m, c.z * inv_t);
  if (m == -kInf) return {0, std::numeric_limits<float>::quiet_NaN()};
  double sum = 0.0;
  float best = -kInf, best_s = 0.0f;
  int64_t best_idx = -1;
  for (const Cand& c : kept) {
    const float s = c.z * inv_t;
    sum += std::exp(static_cast<double>(s - m));
    const float g = -std::log(-std::log(uniform01(key, static_cast<uint32_t>(c.idx))));
    const float k = s + g;
    if (k > best || (k == best && c.idx < best_idx)) {
      best = k;
      best_s = s;
      best_idx = c.idx;
    }
  }
  return {best_idx, best_s - (m + static_cast<float>(std::log(sum)))};
}

// One row with top-k and/or top-p; z is the row as float.
std::pair<int64_t, float> sample_filtered_row(const float* z, int64_t V, float inv_t, int64_t top_k, float top_p,
                                              RowKey key, std::vector<float>& scratch, std::vector<float>& ebuf,
                                              std::vector<Cand>& cand) {
  const bool k_on = top_k > 0 && top_k < V;
  const bool p_on = top_p < 1.0f;
  float thr = k_on ? kth_largest(z, V, top_k, scratch) : -kInf;
  float zmax;
  bool bad;
  masked_max(z, V, thr, zmax, bad);
  if (bad || zmax == -kInf) return {0, std::numeric_limits<float>::quiet_NaN()};
  cand.clear();
  if (p_on) {
    // Radix-style narrowing: histogram the mass of the unnormalised probabilities e = exp(s - max) by their
    // binary exponent; the top-p threshold lies in the exponent bin where the cumulative mass crosses top_p, so
    // only tokens in that bin or above become candidates for the exact selection.
    const float m = zmax * inv_t;
    ebuf.resize(kChunk);
    // Two interleaved histograms halve the store-to-load dependency chains when neighbours share a bin.
    double hist2[2][256] = {{0.0}};
    float bin_min[256];  // smallest logit per bin, so the candidates are exactly "logit >= a cut"
    std::fill(bin_min, bin_min + 256, kInf);
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      masked_exp(z + c0, n, thr, inv_t, m, ebuf.data());
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t b = float_to_bits(ebuf[i]) >> 23;
        hist2[i & 1][b] += ebuf[i];
        bin_min[b] = std::min(bin_min[b], z[c0 + i]);
      }
    }
    double hist[256], total = 0.0;
    for (int b = 0; b < 256; ++b) {
      hist[b] = hist2[0][b] + hist2[1][b];
      total += hist[b];
    }
    const double inv_total = 1.0 / total;
    const double need = static_cast<double>(top_p) * total;
    double cum = 0.0;
    uint32_t bin = 255;
    for (; bin > 0; --bin) {
      cum += hist[bin];
      if (cum >= need) break;
    }
    float cut = kInf;
    for (uint32_t b = bin; b < 256; ++b) cut = std::min(cut, bin_min[b]);
    cut = std::max(cut, thr);
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      masked_exp(z + c0, n, thr, inv_t, m, ebuf.data());
      for (int64_t i = 0; i < n; ++i) {
        if (z[c0 + i] >= cut) {
          cand.push_back({z[c0 + i], static_cast<float>(ebuf[i] * inv_total), c0 + i});
        }
      }
    }
    const float tau = top_p_threshold(cand.data(), static_cast<int64_t>(cand.size()), top_p);
    cand.erase(std::remove_if(cand.begin(), cand.end(), [tau](const Cand& c) { return c.z < tau; }), cand.end());
  } else {
    for (int64_t i = 0; i < V; ++i) {
      if (z[i] >= thr) cand.push_back({z[i], 0.0f, i});
    }
  }
  if (static_cast<int64_t>(cand.size()) * 8 < V) return sample_list(cand, inv_t, key);
  // Many tokens kept: the vectorised chunk pass, restricted to logits >= the final threshold, is faster.
  float final_thr = kInf;
  for (const Cand& c : cand) final_thr = std::min(final_thr, c.z);
  const int64_t n_chunks = (V + kChunk - 1) / kChunk;
  std::vector<ChunkState> states(n_chunks);
  ebuf.resize(kChunk);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t col0 = c * kChunk;
    sample_chunk(z + col0, std::min(kChunk, V - col0), static_cast<uint32_t>(col0), inv_t, final_thr, key, states[c],
                 ebuf.data());
  }
  return merge_chunks(states.data(), n_chunks, false, inv_t, [z](int64_t i) { return z[i]; });
}

template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf.data();
  }
}

template <typename scalar_t>
void sample_impl(const scalar_t* logits, int64_t B, int64_t V, const float* temp, const int64_t* top_k,
                 const float* top_p, const RowKey* row_keys, int64_t* tokens, float* logprobs) {
  std::vector<int64_t> filtered, plain;  // rows needing a selection pass / the chunked pass
  for (int64_t r = 0; r < B; ++r) {
    const bool f = temp[r] > 0 && ((top_k[r] > 0 && top_k[r] < V) || top_p[r] < 1.0f);
    (f ? filtered : plain).push_back(r);
  }
  at::parallel_for(0, static_cast<int64_t>(filtered.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, scratch, ebuf;
    std::vector<Cand> cand;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = filtered[j];
      const float* z = as_float(logits + r * V, V, buf);
      auto [tok, lp] = sample_filtered_row(z, V, 1.0f / temp[r], top_k[r], top_p[r], row_keys[r], scratch,
                                           ebuf, cand);
      tokens[r] = tok;
      logprobs[r] = lp;
    }
  });
  const int64_t n_chunks = (V + kChunk - 1) / kChunk;
  const int64_t n_items = static_cast<int64_t>(plain.size()) * n_chunks;
  std::vector<ChunkState> states(n_items);
  at::parallel_for(0, n_items, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, keys(kChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = plain[item / n_chunks];
      const int64_t col0 = (item % n_chunks) * kChunk;
      const int64_t n = std::min(kChunk, V - col0);
      const float* z = as_float(logits + r * V + col0, n, buf);
      if (temp[r] > 0) {
        sample_chunk(z, n, static_cast<uint32_t>(col0), 1.0f / temp[r], -kInf, row_keys[r], states[item],
                     keys.data());
      } else {
        greedy_chunk(z, n, col0, states[item]);
      }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(plain.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = plain[j];
      const scalar_t* row = logits + r * V;
      auto [tok, lp] = merge_chunks(states.data() + j * n_chunks, n_chunks, temp[r] == 0,
                                    temp[r] > 0 ? 1.0f / temp[r] : 1.0f,
                                    [row](int64_t i) { return static_cast<float>(row[i]); });
      tokens[r] = tok;
      logprobs[r] = lp;
    }
  });
}

// Shared by both ops: checks, dtype conversion and dispatch; keys[r] is row r's noise-stream key.
std::tuple<at::Tensor, at::Tensor> run_sampler(const at::Tensor& logits, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               const std::vector<RowKey>& keys) {
  const int64_t B = logits.size(0), V = logits.size(1);
  auto x = logits.contiguous();
  auto t = temperature.to(at::kFloat).contiguous();
  auto k = top_k.to(at::kLong).contiguous();
  auto p = top_p.to(at::kFloat).contiguous();
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sample_tokens_cpu", [&] {
    sample_impl<scalar_t>(x.data_ptr<scalar_t>(), B, V, t.data_ptr<float>(), k.data_ptr<int64_t>(),
                          p.data_ptr<float>(), keys.data(), tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
  });
  return {tokens, logprobs};
}

void check_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits must be 2-D [B, V], got ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "sample_tokens: empty vocabulary");
  TORCH_CHECK(V < (int64_t(1) << 31), "sample_tokens: vocabulary too large (", V, ")");
  TORCH_CHECK(temperature.numel() == B && top_k.numel() == B && top_p.numel() == B,
              "sample_tokens: temperature, top_k and top_p must have B = ", B, " elements");
}

// One seed per call: row r's stream is keyed by (seed, r).
std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                     const at::Tensor& top_k, const at::Tensor& top_p,
                                                     int64_t seed) {
  check_args(logits, temperature, top_k, top_p);
  std::vector<RowKey> keys(logits.size(0));
  for (int64_t r = 0; r < logits.size(0); ++r) keys[r] = row_key(static_cast<uint64_t>(seed), r);
  return run_sampler(logits, temperature, top_k, top_p, keys);
}

// One seed per row: row r's stream is keyed by seeds[r] alone, so it does not depend on r or the batch.
std::tuple<at::Tensor, at::Tensor> sample_tokens_rowseed_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                             const at::Tensor& top_k, const at::Tensor& top_p,
                                                             const at::Tensor& seeds) {
  check_args(logits, temperature, top_k, top_p);
  TORCH_CHECK(seeds.dim() == 1 && seeds.numel() == logits.size(0), "sample_tokens_rowseed: seeds must be [B = ",
              logits.size(0), "], got ", seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "sample_tokens_rowseed: seeds must be int64, got ",
              seeds.scalar_type());
  auto s = seeds.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  std::vector<RowKey> keys(logits.size(0));
  for (int64_t r = 0; r < logits.size(0); ++r) keys[r] = row_key(static_cast<uint64_t>(sp[r]), 0);
  return run_sampler(logits, temperature, top_k, top_p, keys);
}

}  // namespace
}  // namespace sampling
}  // namespace erpo_fast

TORCH_LIBRARY_FRAGMENT(erpo_fast, m) {
  m.def("sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "sample_tokens_rowseed(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seeds) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(erpo_fast, CPU, m) {
  m.impl("sample_tokens", &erpo_fast::sampling::sample_tokens_cpu);
  m.impl("sample_tokens_rowseed", &erpo_fast::sampling::sample_tokens_rowseed_cpu);
}
