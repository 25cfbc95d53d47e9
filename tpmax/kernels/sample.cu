// Sampling on the device: one token id per row of float32 logits, drawn from the distribution
// of tpmax.sampling.sample: greedy when temperature == 0, else softmax(l / T) restricted to
// the top-k logits (ties at the k-th value kept), then to the smallest prefix of the sorted
// probabilities whose mass before each token is < top_p (ties in index order), renormalised.
// Twin: tpmax.kernels.twins.sample_tokens (same thresholds, same tie rule).
//
// The draw is a Gumbel-max over the kept tokens: argmax_i z_i + G_i, G_i = -log(-log(u_i)),
// u_i from Philox-4x32-10 keyed by seed[b] at counter (position[b], i): deterministic per
// (seed, position). The host twin draws with NumPy's Philox; the two streams differ, the
// distributions are the same.
//
// Thresholds without a sort: a 4-pass radix select (8 bits a pass) over order-preserving
// uint32 keys of z (top-k, counting tokens) and of p (top-p, summing probability mass as
// 40-bit fixed point in uint64, so the sum does not depend on the order of atomics).
//
// Launch: grid (B), block 1024 threads (SAMPLE_THREADS); dynamic shared memory 0.
// Pointers:
//   logits      float32 [B, V]   (already divided by logits_scaling)
//   temperature float32 [B]      0 = greedy
//   top_k       int32   [B]      0 = off
//   top_p       float32 [B]      1 = off
//   seed        uint64  [B]
//   position    int64   [B]      the position of the token being drawn
//   out         int32   [B]      token ids
#include <math_constants.h>

#define SAMPLE_THREADS 1024
#define MASS_ONE 1099511627776.0  // 2^40: fixed-point unit of probability mass

typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------
// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").

__device__ __forceinline__ uint4 philox(uint4 ctr, uint2 key) {
#pragma unroll
  for (int r = 0; r < 10; r++) {
    const unsigned lo0 = 0xD2511F53u * ctr.x, hi0 = __umulhi(0xD2511F53u, ctr.x);
    const unsigned lo1 = 0xCD9E8D57u * ctr.z, hi1 = __umulhi(0xCD9E8D57u, ctr.z);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += 0x9E3779B9u;
    key.y += 0xBB67AE85u;
  }
  return ctr;
}

// Uniform in (0, 1) for token i of the draw at `position` with `seed`.
__device__ __forceinline__ float uniform01(u64 seed, long long position, int i) {
  const uint4 r = philox(make_uint4((unsigned)i, (unsigned)position, (unsigned)((u64)position >> 32), 0u),
                         make_uint2((unsigned)seed, (unsigned)(seed >> 32)));
  return ((r.x >> 8) + 0.5f) * (1.0f / 16777216.0f);  // 24 random bits, never 0 or 1
}

// ---------------------------------------------------------------------------------------
// Block reductions (blockDim.x == SAMPLE_THREADS).

__device__ float block_max(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  v = part[threadIdx.x % 32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

__device__ float block_sum(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  v = part[threadIdx.x % 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

// (value, index) max; ties go to the lower index (argmax's first maximum).
__device__ void block_argmax(float& v, int& idx) {
  __shared__ float pv[32];
  __shared__ int pi[32];
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) v = ov, idx = oi;
  }
  if (threadIdx.x % 32 == 0) pv[threadIdx.x / 32] = v, pi[threadIdx.x / 32] = idx;
  __syncthreads();
  v = pv[threadIdx.x % 32];
  idx = pi[threadIdx.x % 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) v = ov, idx = oi;
  }
  __syncthreads();
}

// Order-preserving key of a float: a < b <=> key(a) < key(b).
__device__ __forceinline__ unsigned fkey(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------
// Radix select: the key tau with weight(key > tau) < target <= weight(key >= tau) over the
// tokens where in(i); `above` gets weight(key > tau). Item supplies in(i), key(i), weight(i).

template <class Item>
__device__ unsigned radix_select(const Item& item, int V, u64 target, u64& above) {
  __shared__ u64 hist[256];
  __shared__ unsigned s_prefix;
  __shared__ u64 s_above;
  unsigned prefix = 0, mask = 0;
  u64 acc_above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      if (!item.in(i)) continue;
      const unsigned k = item.key(i);
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], item.weight(i));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      u64 acc = acc_above;
      int chosen = -1, lowest = -1;
      for (int d = 255; d >= 0; d--) {
        if (hist[d] == 0) continue;
        lowest = d;
        if (acc + hist[d] >= target) {
          chosen = d;
          break;
        }
        acc += hist[d];
      }
      if (chosen < 0) {  // the total fell short of target (rounding): keep everything
        chosen = lowest;
        acc -= hist[lowest];
      }
      s_prefix = prefix | ((unsigned)chosen << shift);
      s_above = acc;
    }
    __syncthreads();
    prefix = s_prefix;
    acc_above = s_above;
    mask |= 255u << shift;
  }
  above = acc_above;
  return prefix;
}

struct ZItem {  // top-k: every token, key of z, weight 1
  const float* row;
  float inv_t;
  __device__ bool in(int) const { return true; }
  __device__ unsigned key(int i) const { return fkey(row[i] * inv_t); }
  __device__ u64 weight(int) const { return 1; }
};

struct PItem {  // top-p: tokens kept by top-k, key of p, fixed-point mass
  const float* row;
  float inv_t, zmax, inv_sum;
  unsigned kkey;
  __device__ float p(int i) const { return __expf(row[i] * inv_t - zmax) * inv_sum; }
  __device__ bool in(int i) const { return fkey(row[i] * inv_t) >= kkey; }
  __device__ unsigned key(int i) const { return fkey(p(i)); }
  __device__ u64 weight(int i) const { return (u64)((double)p(i) * MASS_ONE); }
};

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_tokens(const float* logits, int V, const float* temperature, const int* top_k, const float* top_p,
              const u64* seed, const long long* position, int* out) {
  const int b = blockIdx.x;
  const float* row = logits + (size_t)b * V;
  const float T = temperature[b];
  if (T <= 0.f) {  // greedy
    float v = -CUDART_INF_F;
    int idx = V;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
      if (row[i] > v || (row[i] == v && i < idx)) v = row[i], idx = i;
    block_argmax(v, idx);
    if (threadIdx.x == 0) out[b] = idx;
    return;
  }
  const float inv_t = 1.f / T;
  // top-k: keep key(z) >= kkey
  unsigned kkey = 0;
  const int k = top_k[b];
  if (k > 0 && k < V) {
    u64 above;
    kkey = radix_select(ZItem{row, inv_t}, V, (u64)k, above);
  }
  // softmax over the kept tokens (the maximum is always kept)
  float zmax = -CUDART_INF_F;
  for (int i = threadIdx.x; i < V; i += blockDim.x) zmax = fmaxf(zmax, row[i] * inv_t);
  zmax = block_max(zmax);
  float s = 0.f;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    if (fkey(row[i] * inv_t) >= kkey) s += __expf(row[i] * inv_t - zmax);
  s = block_sum(s);
  const PItem pi{row, inv_t, zmax, 1.f / s, kkey};
  // top-p: keep p > tau, and the first n_tied tokens (by index) with p == tau
  unsigned pkey = 0;
  long long n_tied = 0x7fffffffffffffffLL;
  const float tp = top_p[b];
  if (tp < 1.f) {
    const u64 target = (u64)((double)tp * MASS_ONE);
    u64 above;
    pkey = radix_select(pi, V, target, above);
    const u64 w_tau = (u64)((double)__uint_as_float(pkey & 0x7fffffffu) * MASS_ONE);  // p >= 0: key = bits | 2^31
    n_tied = w_tau == 0 ? 0x7fffffffffffffffLL : (long long)((target - above + w_tau - 1) / w_tau);
  }
  // Gumbel-max over the kept tokens; tied tokens ranked by index through a block scan
  __shared__ int tied_before[SAMPLE_THREADS];
  const int per = (V + blockDim.x - 1) / blockDim.x, i0 = threadIdx.x * per, i1 = min(V, i0 + per);
  int mine = 0;
  for (int i = i0; i < i1; i++) mine += pi.in(i) && pi.key(i) == pkey;
  tied_before[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive prefix sum (once per row: V / 1024 per thread above)
    int acc = 0;
    for (int t = 0; t < blockDim.x; t++) {
      const int c = tied_before[t];
      tied_before[t] = acc;
      acc += c;
    }
  }
  __syncthreads();
  float best = -CUDART_INF_F;
  int idx = V;
  long long rank = tied_before[threadIdx.x];
  for (int i = i0; i < i1; i++) {
    if (!pi.in(i)) continue;
    const unsigned key = pi.key(i);
    if (tp < 1.f && (key < pkey || (key == pkey && rank++ >= n_tied))) continue;
    const float g = row[i] * inv_t - __logf(-__logf(uniform01(seed[b], position[b], i)));
    if (g > best) best = g, idx = i;
  }
  block_argmax(best, idx);
  if (threadIdx.x == 0) out[b] = idx;
}
