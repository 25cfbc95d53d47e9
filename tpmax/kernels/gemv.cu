// bf16 GEMV / skinny GEMM for the decode step: y[b, n] = out_scale * sum_k x[b, k] * W[n, k]
// for 1..8 rows b, float32 accumulation, 16-byte loads of W and x, with an optional RMSNorm
// prologue on x and an epilogue (residual add, or act(gate) * up for a fused [gate; up] W).
// Twin: tpmax.kernels.twins.gemv / rms_norm_rows / residual_add.
//
// Launch (every gemv kernel): grid (ceil(N / 4)), block 128 threads = 4 warps, one output
// feature n per warp; dynamic shared memory 0. Requires 1 <= B <= 8. With K % 8 == 0 (every
// row of x and W then starts 16-byte aligned in a contiguous allocation) loads are 16 bytes;
// other K (uneven TP splits) take a 2-byte-load path.
//
// Pointers (all row-major, contiguous):
//   x        bf16  [B, K]     activations
//   norm_w   bf16  [K]        RMSNorm weight (the *_rmsnorm_* kernels)
//   w        bf16  [N, K]     weight, HF layout [out, in]; the glu kernel: [2N, K] = [gate; up]
//   residual bf16  [B, N]     added after scaling (gemv_residual_bf16)
//   y        bf16 or float32 [B, N]
// Numerics follow tpmax: the RMSNorm output is rounded to bf16 before the product (as
// tpmax.layers.rms_norm returns x's dtype); the product accumulates in float32; the epilogue
// runs in float32 and rounds once to y's dtype.
#include <cuda_bf16.h>

#define GEMV_MAX_B 8
#define GEMV_WARPS 4

enum Epilogue { EPI_NONE = 0, EPI_RESIDUAL = 1, EPI_GLU = 2 };

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// 8 bf16 packed in 16 bytes -> 8 floats.
__device__ __forceinline__ void unpack8(const uint4 u, float f[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float act_fn(float g, int act) {
  if (act == 0) return g / (1.f + __expf(-g));  // silu
  const float c = 0.7978845608028654f;          // gelu_tanh: sqrt(2/pi)
  return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

// 1 / sqrt(mean(x[b]^2) + eps) for every row, by the whole block, into inv_rms[B].
__device__ void block_inv_rms(const __nv_bfloat16* x, int B, int K, float eps, float* inv_rms) {
  __shared__ float part[GEMV_MAX_B][GEMV_WARPS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = 0; b < B; b++) {
    float s = 0.f;
    if (K % 8 == 0) {
      for (int k = threadIdx.x * 8; k < K; k += blockDim.x * 8) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(x + (size_t)b * K + k), f);
#pragma unroll
        for (int i = 0; i < 8; i++) s += f[i] * f[i];
      }
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float f = __bfloat162float(x[(size_t)b * K + k]);
        s += f * f;
      }
    }
    s = warp_sum(s);
    if (lane == 0) part[b][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < B) {
    float s = 0.f;
    for (int w = 0; w < GEMV_WARPS; w++) s += part[threadIdx.x][w];
    inv_rms[threadIdx.x] = rsqrtf(s / K + eps);
  }
  __syncthreads();
}

// One warp: acc[b] = sum_k xn[b, k] * w_row[k] (xn = normed x when NORM).
template <bool NORM>
__device__ __forceinline__ void warp_dot(const __nv_bfloat16* x, const __nv_bfloat16* norm_w, const float* inv_rms,
                                         const __nv_bfloat16* w_row, int B, int K, float acc[GEMV_MAX_B]) {
  const int lane = threadIdx.x % 32;
  if (K % 8 != 0) {  // unaligned rows: one element a lane a step
    for (int k = lane; k < K; k += 32) {
      const float wk = __bfloat162float(w_row[k]), nk = NORM ? __bfloat162float(norm_w[k]) : 1.f;
#pragma unroll
      for (int b = 0; b < GEMV_MAX_B; b++) {
        if (b >= B) break;
        const float xf = __bfloat162float(x[(size_t)b * K + k]);
        acc[b] += (NORM ? __bfloat162float(__float2bfloat16(xf * inv_rms[b] * nk)) : xf) * wk;
      }
    }
  }
  for (int k = lane * 8; K % 8 == 0 && k < K; k += 32 * 8) {
    float wf[8], nf[8];
    unpack8(*reinterpret_cast<const uint4*>(w_row + k), wf);
    if (NORM) unpack8(*reinterpret_cast<const uint4*>(norm_w + k), nf);
#pragma unroll
    for (int b = 0; b < GEMV_MAX_B; b++) {
      if (b >= B) break;
      float xf[8];
      unpack8(*reinterpret_cast<const uint4*>(x + (size_t)b * K + k), xf);
#pragma unroll
      for (int i = 0; i < 8; i++) {
        float xi = NORM ? __bfloat162float(__float2bfloat16(xf[i] * inv_rms[b] * nf[i])) : xf[i];
        acc[b] += xi * wf[i];
      }
    }
  }
#pragma unroll
  for (int b = 0; b < GEMV_MAX_B; b++) acc[b] = warp_sum(acc[b]);
}

__device__ __forceinline__ void store(__nv_bfloat16* y, size_t i, float v) { y[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store(float* y, size_t i, float v) { y[i] = v; }

template <bool NORM, int EPI, typename OutT>
__device__ void gemv_body(const __nv_bfloat16* x, const __nv_bfloat16* norm_w, const __nv_bfloat16* w,
                          const __nv_bfloat16* residual, OutT* y, int B, int N, int K, float eps, float out_scale,
                          int act) {
  __shared__ float inv_rms[GEMV_MAX_B];
  if (NORM) block_inv_rms(x, B, K, eps, inv_rms);
  const int n = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
  if (n >= N) return;  // after the block-wide prologue: no barrier follows
  float acc[GEMV_MAX_B] = {0.f};
  warp_dot<NORM>(x, norm_w, inv_rms, w + (size_t)n * K, B, K, acc);
  float up[GEMV_MAX_B] = {0.f};
  if (EPI == EPI_GLU) warp_dot<NORM>(x, norm_w, inv_rms, w + (size_t)(n + N) * K, B, K, up);
  if (threadIdx.x % 32 != 0) return;
  for (int b = 0; b < B; b++) {
    float v = acc[b];
    if (EPI == EPI_GLU) {  // gate and up are each rounded to bf16 first, as the unfused layer does
      float g = __bfloat162float(__float2bfloat16(v)), u = __bfloat162float(__float2bfloat16(up[b]));
      v = __bfloat162float(__float2bfloat16(act_fn(g, act))) * u;
    }
    v *= out_scale;
    if (EPI == EPI_RESIDUAL) v += __bfloat162float(residual[(size_t)b * N + n]);
    store(y, (size_t)b * N + n, v);
  }
}

extern "C" __global__ void gemv_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int B,
                                     int N, int K, float out_scale) {
  gemv_body<false, EPI_NONE>(x, nullptr, w, nullptr, y, B, N, K, 0.f, out_scale, 0);
}

extern "C" __global__ void gemv_residual_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w,
                                              const __nv_bfloat16* residual, __nv_bfloat16* y, int B, int N, int K,
                                              float out_scale) {
  gemv_body<false, EPI_RESIDUAL>(x, nullptr, w, residual, y, B, N, K, 0.f, out_scale, 0);
}

extern "C" __global__ void rmsnorm_gemv_bf16(const __nv_bfloat16* x, const __nv_bfloat16* norm_w,
                                             const __nv_bfloat16* w, __nv_bfloat16* y, int B, int N, int K, float eps,
                                             float out_scale) {
  gemv_body<true, EPI_NONE>(x, norm_w, w, nullptr, y, B, N, K, eps, out_scale, 0);
}

// act: 0 = silu, 1 = gelu_tanh. w is [2N, K] = [gate; up]; y is [B, N].
extern "C" __global__ void rmsnorm_gemv_glu_bf16(const __nv_bfloat16* x, const __nv_bfloat16* norm_w,
                                                 const __nv_bfloat16* w, __nv_bfloat16* y, int B, int N, int K,
                                                 float eps, int act) {
  gemv_body<true, EPI_GLU>(x, norm_w, w, nullptr, y, B, N, K, eps, 1.f, act);
}

// Final norm + lm_head: float32 logits, out_scale = 1 / logits_scaling.
extern "C" __global__ void rmsnorm_gemv_f32(const __nv_bfloat16* x, const __nv_bfloat16* norm_w,
                                            const __nv_bfloat16* w, float* y, int B, int N, int K, float eps,
                                            float out_scale) {
  gemv_body<true, EPI_NONE>(x, norm_w, w, nullptr, y, B, N, K, eps, out_scale, 0);
}

// Standalone RMSNorm (before a quantized GEMV, which has no prologue).
// Launch: grid (B), block 128; x, y bf16 [B, K]; norm_w bf16 [K]; K % 8 == 0.
extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* norm_w, __nv_bfloat16* y,
                                         int K, float eps) {
  __shared__ float inv_rms[1];
  const __nv_bfloat16* xr = x + (size_t)blockIdx.x * K;
  block_inv_rms(xr, 1, K, eps, inv_rms);
  for (int k = threadIdx.x; k < K; k += blockDim.x)
    y[(size_t)blockIdx.x * K + k] = __float2bfloat16(__bfloat162float(xr[k]) * inv_rms[0] * __bfloat162float(norm_w[k]));
}

// y = x + scale * a (the residual after an all-reduce at TP > 1).
// Launch: grid (ceil(n / 256)), block 256; x, a, y bf16 [n].
extern "C" __global__ void residual_add_bf16(const __nv_bfloat16* x, const __nv_bfloat16* a, __nv_bfloat16* y,
                                             int n, float scale) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(__bfloat162float(x[i]) + scale * __bfloat162float(a[i]));
}

// act(gate) * up of a quantized [gate; up] projection's output (which has no fused epilogue).
// Launch: grid (ceil(B * N / 256)), block 256; gu bf16 [B, 2N]; y bf16 [B, N]; act as above.
extern "C" __global__ void glu_bf16(const __nv_bfloat16* gu, __nv_bfloat16* y, int B, int N, int act) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B * N) return;
  const int b = i / N, n = i % N;
  const float g = __bfloat162float(gu[(size_t)b * 2 * N + n]), u = __bfloat162float(gu[(size_t)b * 2 * N + N + n]);
  y[i] = __float2bfloat16(__bfloat162float(__float2bfloat16(act_fn(g, act))) * u);
}
