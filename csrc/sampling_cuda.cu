// CUDA implementation of torch.ops.erpo_fast.sample_tokens (same semantics as sampling_cpu.cpp and
// kernels/sampling/naive.py). One block per row:
//   1. top-k: bisection over the order-preserving int32 key of the logits (32 exact block-wide counts) gives
//      the k-th largest logit; top-p: a second bisection (32 block-wide mass sums) gives the smallest logit whose
//      strictly-larger mass is < top_p. Rows without filters skip both.
//   2. one pass over the kept tokens: per-thread online logsumexp and Gumbel argmax with the shared
//      counter-based RNG (sampling_common.h), then block reductions.
// Written to be simple and correct rather than fast; built only where CUDA and a CUDA torch exist.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "sampling_common.h"

namespace erpo_fast {
namespace sampling {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Best {
  float key;    // Gumbel key (greedy: the logit)
  float s;      // scaled logit of that token
  int64_t idx;  // token; ties go to the smaller index
};

__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct IntSumOp {
  __device__ int operator()(int a, int b) const { return a + b; }
};

// Block-wide reduction; every thread gets the result. `shm` holds kWarps values.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* shm) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffU, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call may still be reading shm
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < kWarps ? shm[lane] : identity;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffU, v, o));
  return v;
}

__device__ Best block_best(Best b, Best* shm) {
  for (int o = 16; o > 0; o >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffU, b.key, o), __shfl_xor_sync(0xffffffffU, b.s, o),
               __shfl_xor_sync(0xffffffffU, b.idx, o)};
    if (better(other, b)) b = other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = b;
  __syncthreads();
  b = lane < kWarps ? shm[lane] : Best{-INFINITY, 0.0f, INT64_MAX};
  for (int o = 16; o > 0; o >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffU, b.key, o), __shfl_xor_sync(0xffffffffU, b.s, o),
               __shfl_xor_sync(0xffffffffU, b.idx, o)};
    if (better(other, b)) b = other;
  }
  return b;
}

__device__ __forceinline__ int32_t key_of(float x) { return float_key(__float_as_int(x + 0.0f)); }

// E = -log(u) ~ Exp(1), accurate also for u near 1 (series in w = 1 - u, which is exact for our u).
__device__ __forceinline__ float exponential_from_uniform(float u) {
  const float w = 1.0f - u;
  return w < 0.0078125f ? w * (1.0f + w * (0.5f + w * (1.0f / 3.0f + w * 0.25f))) : -logf(u);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sample_kernel(const scalar_t* __restrict__ logits, int64_t V,
                                                          const float* __restrict__ temp,
                                                          const int64_t* __restrict__ top_k,
                                                          const float* __restrict__ top_p, uint64_t seed,
                                                          const int64_t* __restrict__ row_seeds,
                                                          int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  __shared__ float shf[kWarps];
  __shared__ int shi[kWarps];
  __shared__ Best shb[kWarps];
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * V;
  const float t = temp[row];
  const bool greedy = t == 0.0f;
  const float inv_t = greedy ? 1.0f : 1.0f / t;
  const int64_t k = top_k[row];
  const float p = top_p[row];

  int64_t thr_key = INT32_MIN;  // kept iff key >= thr_key
  if (!greedy && k > 0 && k < V) {
    int64_t lo = INT32_MIN, hi = int64_t(1) << 31;  // lo valid (count >= k), hi not
    for (int it = 0; it < 32; ++it) {
      const int64_t mid = lo + (hi - lo) / 2;
      int count = 0;
      for (int64_t i = threadIdx.x; i < V; i += kThreads) count += key_of(static_cast<float>(z[i])) >= mid;
      count = block_reduce(count, IntSumOp(), 0, shi);
      if (count >= k) lo = mid; else hi = mid;
    }
    thr_key = lo;
  }
  if (!greedy && p < 1.0f) {
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float x = static_cast<float>(z[i]);
      if (key_of(x) >= thr_key) m = fmaxf(m, x * inv_t);
    }
    m = block_reduce(m, MaxOp(), -INFINITY, shf);
    if (m == -INFINITY) m = 0.0f;
    float total = 0.0f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float x = static_cast<float>(z[i]);
      if (key_of(x) >= thr_key) total += expf(x * inv_t - m);
    }
    total = block_reduce(total, SumOp(), 0.0f, shf);
    int64_t lo = thr_key - 1, hi = INT32_MAX;  // lo: everything is above it (invalid); hi: nothing (valid)
    for (int it = 0; it < 32; ++it) {
      const int64_t mid = lo + (hi - lo) / 2;
      float mass = 0.0f;
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        const float x = static_cast<float>(z[i]);
        const int32_t key = key_of(x);
        if (key >= thr_key && key > mid) mass += expf(x * inv_t - m);
      }
      mass = block_reduce(mass, SumOp(), 0.0f, shf);
      if (mass < p * total) hi = mid; else lo = mid;
    }
    thr_key = hi;
  }

  // Per-row seeds (sample_tokens_rowseed) key the stream by the row's seed alone; else by (seed, row).
  const RowKey rk = row_seeds != nullptr ? row_key(static_cast<uint64_t>(row_seeds[row]), 0)
                                         : row_key(seed, static_cast<uint64_t>(row));
  float m = -INFINITY, total = 0.0f;
  int bad = 0;
  Best best{-INFINITY, 0.0f, INT64_MAX};
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float x = static_cast<float>(z[i]);
    bad |= isnan(x) || x == INFINITY;
    if (greedy ? isnan(x) : key_of(x) < thr_key) continue;
    const float s = x * inv_t;
    if (s != -INFINITY) {  // online logsumexp
      if (s > m) {
        total = total * expf(m - s) + 1.0f;
        m = s;
      } else {
        total += expf(s - m);
      }
    }
    const float key = greedy ? s : s - logf(exponential_from_uniform(uniform01(rk, static_cast<uint32_t>(i))));
    const Best cand{key, s, i};
    if (better(cand, best)) best = cand;
  }
  bad = block_reduce(bad, IntSumOp(), 0, shi);
  const float m_all = block_reduce(m, MaxOp(), -INFINITY, shf);
  const float part = (m == -INFINITY) ? 0.0f : total * expf(m - m_all);
  const float total_all = block_reduce(part, SumOp(), 0.0f, shf);
  best = block_best(best, shb);
  if (threadIdx.x == 0) {
    const bool invalid = bad > 0 || m_all == -INFINITY || best.idx == INT64_MAX;
    tokens[row] = invalid && best.idx == INT64_MAX ? 0 : best.idx;
    logprobs[row] = invalid ? NAN : (greedy ? 0.0f : best.s - (m_all + logf(total_all)));
  }
}

// Shared by both ops; `row_seeds` is undefined for the one-seed-per-call op.
std::tuple<at::Tensor, at::Tensor> run_sampler(const at::Tensor& logits, const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p, int64_t seed,
                                               const at::Tensor& row_seeds) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits must be 2-D [B, V], got ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "sample_tokens: empty vocabulary");
  TORCH_CHECK(V < (int64_t(1) << 31), "sample_tokens: vocabulary too large (", V, ")");
  TORCH_CHECK(temperature.numel() == B && top_k.numel() == B && top_p.numel() == B,
              "sample_tokens: temperature, top_k and top_p must have B = ", B, " elements");
  TORCH_CHECK(temperature.device() == logits.device() && top_k.device() == logits.device() &&
                  top_p.device() == logits.device(),
              "sample_tokens: all tensors must be on the logits' device");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto x = logits.contiguous();
  auto t = temperature.to(at::kFloat).contiguous();
  auto k = top_k.to(at::kLong).contiguous();
  auto p = top_p.to(at::kFloat).contiguous();
  at::Tensor s;
  if (row_seeds.defined()) {
    TORCH_CHECK(row_seeds.dim() == 1 && row_seeds.numel() == B, "sample_tokens_rowseed: seeds must be [B = ", B,
                "], got ", row_seeds.sizes());
    TORCH_CHECK(row_seeds.scalar_type() == at::kLong, "sample_tokens_rowseed: seeds must be int64");
    TORCH_CHECK(row_seeds.device() == logits.device(), "sample_tokens_rowseed: seeds must be on the logits' device");
    s = row_seeds.contiguous();
  }
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sample_tokens_cuda", [&] {
    sample_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), V, t.data_ptr<float>(), k.data_ptr<int64_t>(), p.data_ptr<float>(),
        static_cast<uint64_t>(seed), s.defined() ? s.data_ptr<int64_t>() : nullptr, tokens.data_ptr<int64_t>(),
        logprobs.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, logprobs};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                      const at::Tensor& top_k, const at::Tensor& top_p,
                                                      int64_t seed) {
  return run_sampler(logits, temperature, top_k, top_p, seed, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_rowseed_cuda(const at::Tensor& logits,
                                                              const at::Tensor& temperature, const at::Tensor& top_k,
                                                              const at::Tensor& top_p, const at::Tensor& seeds) {
  return run_sampler(logits, temperature, top_k, top_p, 0, seeds);
}

}  // namespace
}  // namespace sampling
}  // namespace erpo_fast

TORCH_LIBRARY_IMPL(erpo_fast, CUDA, m) {
  m.impl("sample_tokens", &erpo_fast::sampling::sample_tokens_cuda);
  m.impl("sample_tokens_rowseed", &erpo_fast::sampling::sample_tokens_rowseed_cuda);
}
