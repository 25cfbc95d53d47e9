// Dequantize-GEMV for quantized decode weights, 1..8 rows, float32 accumulation, without a
// dequantized copy of the weight: y[b, n] = out_scale * sum_k x[b, k] * W[n, k].
// Twins: tpmax.kernels.twins.gptq_int4_gemv / fp8_e4m3_gemv (references: tpmax.quant's
// GPTQWeight / FP8Weight .dequantize()).
//
// gptq_int4_gemv: W[n, k] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n], g(k) = g_idx[k] when
// g_idx is given, else k / group_size (tpmax.quant.GPTQWeight with bits = 4).
//   Launch: grid (ceil(N / 128)), block (32, 8): threadIdx.x owns 4 adjacent outputs (one
//   16-byte load of 4 packed words per row of qweight when N % 4 == 0, else 4 single loads),
//   threadIdx.y strides over the K/8 words; dynamic shared 0. Requires 1 <= B <= 8.
//   Pointers:
//     x        bf16    [B, K]
//     qweight  int32   [ceil(K / 8), N]  8 nibbles along K per word, value j in bits [4j, 4j+4)
//     scales   fp16    [G, N]
//     zeros    uint8   [G, N]            the real zero points (tpmax unpacks HF qzeros on load)
//     g_idx    int32   [K] or null
//     y        bf16    [B, N]
//
// fp8_e4m3_gemv: W[n, k] = e4m3(w[n, k]) * scale (scale[0] per tensor, scale[n] per row).
//   Launch: grid (ceil(N / 4)), block 128 threads = 4 warps, one output row per warp, 16-byte
//   loads of 16 e4m3 values when K % 16 == 0 (else one value a lane a step); dynamic shared 0.
//   Requires 1 <= B <= 8.
//   Pointers:
//     x      bf16    [B, K]
//     w      uint8   [N, K]  e4m3 bit patterns (tpmax.quant.FP8Weight.w)
//     scale  float32 [1] (row_scale = 0) or [N] (row_scale = 1)
//     y      bf16    [B, N]
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#define DQ_MAX_B 8

extern "C" __global__ void gptq_int4_gemv(const __nv_bfloat16* x, const int* qweight, const __half* scales, const unsigned char* zeros,
               const int* g_idx, int group_size, __nv_bfloat16* y, int B, int N, int K, float out_scale) {
  __shared__ float red[8][DQ_MAX_B][128];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int n0 = (blockIdx.x * 32 + tx) * 4;
  float acc[DQ_MAX_B][4] = {{0.f}};
  if (n0 < N) {
    const int words = (K + 7) / 8;
    for (int kw = ty; kw < words; kw += 8) {
      unsigned q4[4];
      if (N % 4 == 0) {
        const int4 packed = *reinterpret_cast<const int4*>(qweight + (size_t)kw * N + n0);
        q4[0] = packed.x, q4[1] = packed.y, q4[2] = packed.z, q4[3] = packed.w;
      } else {
#pragma unroll
        for (int c = 0; c < 4; c++) q4[c] = n0 + c < N ? (unsigned)qweight[(size_t)kw * N + n0 + c] : 0u;
      }
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const int k = kw * 8 + j;
        if (k >= K) break;
        const int g = g_idx != nullptr ? g_idx[k] : k / group_size;
        float w[4];
#pragma unroll
        for (int c = 0; c < 4; c++) {
          const size_t gi = (size_t)g * N + min(n0 + c, N - 1);  // columns past N compute garbage, never stored
          w[c] = ((float)((q4[c] >> (4 * j)) & 15u) - (float)zeros[gi]) * __half2float(scales[gi]);
        }
#pragma unroll
        for (int b = 0; b < DQ_MAX_B; b++) {
          if (b >= B) break;
          const float xv = __bfloat162float(x[(size_t)b * K + k]);
#pragma unroll
          for (int c = 0; c < 4; c++) acc[b][c] += xv * w[c];
        }
      }
    }
  }
#pragma unroll
  for (int b = 0; b < DQ_MAX_B; b++)
#pragma unroll
    for (int c = 0; c < 4; c++) red[ty][b][tx * 4 + c] = acc[b][c];
  __syncthreads();
  if (ty != 0 || n0 >= N) return;
  for (int b = 0; b < B; b++)
    for (int c = 0; c < 4 && n0 + c < N; c++) {
      float s = 0.f;
      for (int r = 0; r < 8; r++) s += red[r][b][tx * 4 + c];
      y[(size_t)b * N + n0 + c] = __float2bfloat16(s * out_scale);
    }
}

extern "C" __global__ void fp8_e4m3_gemv(const __nv_bfloat16* x, const unsigned char* w, const float* scale,
                                         int row_scale, __nv_bfloat16* y, int B, int N, int K, float out_scale) {
  const int n = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  float acc[DQ_MAX_B] = {0.f};
  if (K % 16 != 0) {
    for (int k = lane; k < K; k += 32) {
      const float wk = __half2float(__half(__nv_cvt_fp8_to_halfraw(w[(size_t)n * K + k], __NV_E4M3)));
#pragma unroll
      for (int b = 0; b < DQ_MAX_B; b++) {
        if (b >= B) break;
        acc[b] += __bfloat162float(x[(size_t)b * K + k]) * wk;
      }
    }
  }
  for (int k = lane * 16; K % 16 == 0 && k < K; k += 32 * 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(w + (size_t)n * K + k);
    const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&u);
    float wf[16];
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[i], __NV_E4M3)));
      wf[2 * i] = f.x;
      wf[2 * i + 1] = f.y;
    }
#pragma unroll
    for (int b = 0; b < DQ_MAX_B; b++) {
      if (b >= B) break;
      const __nv_bfloat162* xb = reinterpret_cast<const __nv_bfloat162*>(x + (size_t)b * K + k);
#pragma unroll
      for (int i = 0; i < 8; i++) {
        const float2 xf = __bfloat1622float2(xb[i]);
        acc[b] += xf.x * wf[2 * i] + xf.y * wf[2 * i + 1];
      }
    }
  }
  const float s = (row_scale ? scale[n] : scale[0]) * out_scale;
  for (int b = 0; b < B; b++) {
    float v = acc[b];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) y[(size_t)b * N + n] = __float2bfloat16(v * s);
  }
}
