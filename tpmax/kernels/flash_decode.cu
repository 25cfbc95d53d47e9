// Flash-decoding over the paged bf16 KV cache: one query token per sequence, the visible keys
// cut into splits of `chunk` keys, each split reduced by one block with an online softmax
// (flash_decode_split), then the splits merged (flash_decode_combine).
// Twin: tpmax.kernels.twins.flash_decode (same split / combine decomposition).
//
// Visible keys of sequence b (length L = lengths[b], its query at position L - 1):
// [lo, L) with lo = max(0, L - window) when window > 0 (sliding window: the token and the
// previous window - 1), else lo = 0. Split s covers [lo + s * chunk, lo + (s + 1) * chunk).
//
// flash_decode_split
//   Launch: grid (B, n_q / G, max_splits), block 128 threads (4 warps); dynamic shared 0.
//   G = q heads per block (1 <= G <= 8): the G heads [y*G, y*G + G) all read one kv head
//   (kv_of_q[y*G]), so each K/V row is loaded once for the G of them (GQA sharing).
//   Warp w takes keys w, w + 4, ... of the split; lane l holds dims l, l + 32, ... (hd <= 256).
//   Pointers:
//     q        bf16    [B, n_q, hd]
//     pages    bf16    [num_layers, 2, num_pages, page_size, n_kv, hd]   (tpmax.kv_cache)
//     tables   int32   [B, max_pages]   page ids of each sequence, in order
//     lengths  int32   [B]              cache length including this step's token
//     kv_of_q  int32   [n_q]            local kv head of each local q head
//     o_part   float32 [B, n_q, max_splits, hd]   unnormalised sum_t exp(s_t - m) v_t
//     ml_part  float32 [B, n_q, max_splits, 2]    (m, l): running max and sum of exp
//   An empty split (past the visible keys) writes m = -inf, l = 0, o = 0.
//
// flash_decode_combine
//   Launch: grid (B * n_q), block 128 threads; dynamic shared 0.
//   out bf16 [B, n_q, hd] = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s, M = max_s m_s.
#include <cuda_bf16.h>
#include <math_constants.h>

#define FD_WARPS 4
#define FD_MAX_G 8
#define FD_MAX_D 8  // dims per lane: hd <= 256

__device__ __forceinline__ float fd_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void __launch_bounds__(FD_WARPS * 32)
flash_decode_split(const __nv_bfloat16* q, const __nv_bfloat16* pages, const int* tables, const int* lengths,
                   const int* kv_of_q, int layer, int num_pages, int page_size, int max_pages, int n_q, int n_kv,
                   int hd, int G, int window, int chunk, int max_splits, float scale, float* o_part,
                   float* ml_part) {
  __shared__ float sm_m[FD_WARPS][FD_MAX_G], sm_l[FD_WARPS][FD_MAX_G];
  __shared__ float sm_o[FD_WARPS][FD_MAX_G][FD_MAX_D * 32];
  const int b = blockIdx.x, h0 = blockIdx.y * G, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int L = lengths[b], lo = window > 0 ? max(0, L - window) : 0;
  const int t0 = lo + split * chunk, t1 = min(L, t0 + chunk);
  const int kvh = kv_of_q[h0];
  const size_t kv_stride = (size_t)num_pages * page_size * n_kv * hd;  // k -> v of one layer
  const __nv_bfloat16* kbase = pages + (size_t)layer * 2 * kv_stride;

  float qf[FD_MAX_G][FD_MAX_D], acc[FD_MAX_G][FD_MAX_D], m[FD_MAX_G], l[FD_MAX_G];
#pragma unroll
  for (int g = 0; g < FD_MAX_G; g++) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < FD_MAX_D; j++) {
      const int d = lane + 32 * j;
      qf[g][j] = (g < G && d < hd) ? __bfloat162float(q[((size_t)b * n_q + h0 + g) * hd + d]) * scale : 0.f;
      acc[g][j] = 0.f;
    }
  }
  for (int t = t0 + warp; t < t1; t += FD_WARPS) {
    const int pg = tables[(size_t)b * max_pages + t / page_size];
    const size_t row = (((size_t)pg * page_size + t % page_size) * n_kv + kvh) * hd;
    float kf[FD_MAX_D], vf[FD_MAX_D];
#pragma unroll
    for (int j = 0; j < FD_MAX_D; j++) {
      const int d = lane + 32 * j;
      kf[j] = d < hd ? __bfloat162float(kbase[row + d]) : 0.f;
      vf[j] = d < hd ? __bfloat162float(kbase[kv_stride + row + d]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < FD_MAX_G; g++) {
      if (g >= G) break;
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < FD_MAX_D; j++) s += qf[g][j] * kf[j];
      s = fd_warp_sum(s);
      const float m_new = fmaxf(m[g], s), corr = __expf(m[g] - m_new), p = __expf(s - m_new);
      l[g] = l[g] * corr + p;
#pragma unroll
      for (int j = 0; j < FD_MAX_D; j++) acc[g][j] = acc[g][j] * corr + p * vf[j];
      m[g] = m_new;
    }
  }
  // merge the 4 warps' states
#pragma unroll
  for (int g = 0; g < FD_MAX_G; g++) {
    if (g >= G) break;
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
#pragma unroll
    for (int j = 0; j < FD_MAX_D; j++) sm_o[warp][g][lane + 32 * j] = acc[g][j];
  }
  __syncthreads();
  const size_t part = ((size_t)b * n_q + h0) * max_splits + split;  // + g * max_splits per head
  for (int e = threadIdx.x; e < G * hd; e += blockDim.x) {
    const int g = e / hd, d = e % hd;
    float M = -CUDART_INF_F;
    for (int w = 0; w < FD_WARPS; w++) M = fmaxf(M, sm_m[w][g]);
    float o = 0.f, lsum = 0.f;
    if (M != -CUDART_INF_F) {
      for (int w = 0; w < FD_WARPS; w++) {
        const float c = __expf(sm_m[w][g] - M);  // 0 for a warp that saw no key
        o += c * sm_o[w][g][d];
        lsum += c * sm_l[w][g];
      }
    }
    const size_t p = part + (size_t)g * max_splits;
    o_part[p * hd + d] = o;
    if (d == 0) {
      ml_part[p * 2] = M;
      ml_part[p * 2 + 1] = lsum;
    }
  }
}

extern "C" __global__ void flash_decode_combine(const float* o_part, const float* ml_part, int max_splits, int hd,
                                                __nv_bfloat16* out) {
  const size_t bh = blockIdx.x;  // b * n_q + h
  const float* ml = ml_part + bh * max_splits * 2;
  float M = -CUDART_INF_F;
  for (int s = 0; s < max_splits; s++) M = fmaxf(M, ml[2 * s]);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.f, lsum = 0.f;
    for (int s = 0; s < max_splits; s++) {
      if (ml[2 * s] == -CUDART_INF_F) continue;  // empty split
      const float c = __expf(ml[2 * s] - M);
      o += c * o_part[(bh * max_splits + s) * hd + d];
      lsum += c * ml[2 * s + 1];
    }
    out[bh * hd + d] = __float2bfloat16(o / lsum);
  }
}
