// The QKV projection's epilogue for a decode step: bias, optional per-head RMSNorm of q and
// k (qk-norm), RoPE at each token's position (interleaved pairs or halves), q out, and k/v
// written into the paged KV cache. Twin: tpmax.kernels.twins.qkv_rope_kv_write.
//
// Launch: grid (B, n_q + 2 * n_kv) (one block per token and head: q heads, then k, then v),
// block hd / 2 threads rounded up to a multiple of 32 (thread i < hd / 2 owns one rotation
// pair, the rest only join the qk-norm reduction); hd even, 2 <= hd <= 2048; dynamic shared 0.
//
// Pointers (row-major, contiguous):
//   qkv      bf16    [B, (n_q + 2 n_kv) * hd]  the projection's output (q heads, k heads, v heads)
//   bias     bf16    [(n_q + 2 n_kv) * hd]     or null
//   q_norm   bf16    [hd]  k_norm bf16 [hd]      or null (no qk-norm)
//   cos_tab  float32 [max_pos, hd / 2]         cos(pos * inv_freq), RotaryEmbedding.cos_sin
//   sin_tab  float32 [max_pos, hd / 2]
//   positions, page, slot  int32 [B]           absolute position, cache page and in-page slot
//   pages    bf16    [num_layers, 2, num_pages, page_size, n_kv, hd]  (tpmax.kv_cache layout)
//   q_out    bf16    [B, n_q, hd]
// Numerics follow tpmax.attention.qkv_rope: bias added then rounded to bf16, qk-norm in float32
// rounded to bf16, rotation in float32 rounded to bf16.
#include <cuda_bf16.h>

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16(v)); }

// Sum of v over the block (blockDim.x <= 1024); every thread gets the total.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < (blockDim.x + 31) / 32; w++) s += part[w];
    total = s;
  }
  __syncthreads();
  return total;
}

extern "C" __global__ void qkv_rope_kv_write(const __nv_bfloat16* qkv, const __nv_bfloat16* bias,
                                             const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm, float qk_eps,
                                             const float* cos_tab, const float* sin_tab, const int* positions,
                                             const int* page, const int* slot, __nv_bfloat16* pages, int layer,
                                             int num_pages, int page_size, int n_q, int n_kv, int hd, int interleaved,
                                             __nv_bfloat16* q_out) {
  const int b = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = hd / 2;
  const int heads = n_q + 2 * n_kv;
  // the pair this thread owns: (2i, 2i+1) interleaved, (i, i + hd/2) halves
  const int d0 = interleaved ? 2 * i : i, d1 = interleaved ? 2 * i + 1 : i + half;
  const bool owner = i < half;  // the padding threads hold zeros
  const size_t src = ((size_t)b * heads + head) * hd;
  float a = owner ? __bfloat162float(qkv[src + d0]) : 0.f, c = owner ? __bfloat162float(qkv[src + d1]) : 0.f;
  if (bias != nullptr && owner) {
    a = bf16_round(a + __bfloat162float(bias[(size_t)head * hd + d0]));
    c = bf16_round(c + __bfloat162float(bias[(size_t)head * hd + d1]));
  }
  const bool is_q = head < n_q, is_k = !is_q && head < n_q + n_kv;
  const __nv_bfloat16* nw = is_q ? q_norm : is_k ? k_norm : nullptr;
  if (nw != nullptr) {  // uniform per block: the barriers inside block_sum are safe
    const float inv = rsqrtf(block_sum(a * a + c * c) / hd + qk_eps);
    a = bf16_round(a * inv * (owner ? __bfloat162float(nw[d0]) : 0.f));
    c = bf16_round(c * inv * (owner ? __bfloat162float(nw[d1]) : 0.f));
  }
  if (!owner) return;
  if (is_q || is_k) {
    const size_t t = (size_t)positions[b] * half + i;
    const float cs = cos_tab[t], sn = sin_tab[t];
    const float ra = a * cs - c * sn, rc = c * cs + a * sn;
    a = ra;
    c = rc;
  }
  __nv_bfloat16* dst;
  if (is_q) {
    dst = q_out + ((size_t)b * n_q + head) * hd;
  } else {
    const int kv = is_k ? 0 : 1, h = head - n_q - (is_k ? 0 : n_kv);
    dst = pages + ((((size_t)layer * 2 + kv) * num_pages + page[b]) * page_size + slot[b]) * n_kv * hd +
          (size_t)h * hd;
  }
  dst[d0] = __float2bfloat16(a);
  dst[d1] = __float2bfloat16(c);
}
