// dit::adaln_modulate bodies: out = LayerNorm_no_affine(x; eps) * (1 + scale[b]) + shift[b], and the variant fused
// with the gated residual h = residual + gate[b] * y. Launch contract: csrc/README.md.
//
// Bandwidth-bound: x (or residual and y) is read once, out (and h) written once. Each row stays in registers
// (at most kAdaLNBytesPerThread bytes of it per thread), statistics are two-pass in fp32 over those registers.
#pragma once

#include "dit_common.cuh"

namespace dit {

constexpr int kAdaLNBytesPerThread = 32;  // two 16-byte packs: fits 64 registers, so __launch_bounds__(1024)
constexpr int kAdaLNMaxThreads = 1024;    // per block

__host__ __device__ constexpr int64_t adaln_max_dim(int elem_bytes) {
  return int64_t(kAdaLNMaxThreads) * (kAdaLNBytesPerThread / elem_bytes);
}

// Threads per row (blockDim.x): a multiple of 32 giving about two 16-byte packs per thread.
__host__ __device__ inline int adaln_threads_x(int64_t dim, int elem_bytes) {
  const int64_t v = 16 / elem_bytes;
  const int64_t chunks = dim % v == 0 ? dim / v : dim;  // packs, or scalars when dim is not a multiple of v
  const int64_t t = ((chunks + 1) / 2 + 31) / 32 * 32;
  return int(t < 32 ? 32 : t > kAdaLNMaxThreads ? kAdaLNMaxThreads : t);
}

// Rows per block (blockDim.y): small rows share a block so that blocks keep at least 256 threads.
__host__ __device__ inline int adaln_rows_per_block(int threads_x) {
  return threads_x >= 256 ? 1 : 256 / threads_x;
}

// Sum over the blockDim.x threads of this thread's row. Every thread of the block must call it (it syncs).
__device__ __forceinline__ float adaln_row_sum(float v, float* red) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int warps = blockDim.x >> 5, first = threadIdx.y * warps;
  __syncthreads();  // red may still be read by the previous call
  if ((threadIdx.x & 31) == 0) red[first + (threadIdx.x >> 5)] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < warps; ++w) s += red[first + w];  // same order in every thread: same mean everywhere
  return s;
}

// V elements per pack (16 bytes, or 1 for the unaligned path); C packs held per thread.
template <typename T, int V, bool kResidual>
__device__ __forceinline__ void adaln_rows(const T* __restrict__ x, const T* __restrict__ y,
                                           const T* __restrict__ gate, const T* __restrict__ shift,
                                           const T* __restrict__ scale, T* __restrict__ h, T* __restrict__ out,
                                           int64_t rows, int64_t tokens, int dim, float eps, float* red) {
  constexpr int C = kAdaLNBytesPerThread / int(sizeof(T)) / V;
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;  // threads past the last row still take part in the block syncs
  const int64_t at = valid ? row * dim : 0;
  const int64_t mod = valid ? row / tokens * dim : 0;  // this sample's row of gate/shift/scale
  float v[C][V];
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int j = (threadIdx.x + c * blockDim.x) * V;
    if (valid && j < dim) {
      load_pack<T, V>(x + at + j, v[c]);
      if (kResidual) {
        float yv[V], gv[V];
        load_pack<T, V>(y + at + j, yv);
        load_pack<T, V>(gate + mod + j, gv);
#pragma unroll
        for (int e = 0; e < V; ++e) v[c][e] = __fadd_rn(v[c][e], __fmul_rn(gv[e], yv[e]));  // as torch rounds it
        store_pack<T, V>(h + at + j, v[c]);
#pragma unroll
        for (int e = 0; e < V; ++e) v[c][e] = to_float(from_float<T>(v[c][e]));  // normalise h as stored
      }
#pragma unroll
      for (int e = 0; e < V; ++e) sum += v[c][e];
    }
  }
  const float mean = adaln_row_sum(sum, red) / dim;
  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int j = (threadIdx.x + c * blockDim.x) * V;
    if (valid && j < dim) {
#pragma unroll
      for (int e = 0; e < V; ++e) sq += (v[c][e] - mean) * (v[c][e] - mean);
    }
  }
  const float rstd = 1.f / sqrtf(adaln_row_sum(sq, red) / dim + eps);
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int j = (threadIdx.x + c * blockDim.x) * V;
    if (valid && j < dim) {
      float sh[V], sc[V], o[V];
      load_pack<T, V>(shift + mod + j, sh);
      load_pack<T, V>(scale + mod + j, sc);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = (v[c][e] - mean) * rstd * (1.f + sc[e]) + sh[e];
      store_pack<T, V>(out + at + j, o);
    }
  }
}

// x, out (batch, tokens, dim); shift, scale (batch, dim); all contiguous.
template <typename T>
__device__ void adaln_modulate_body(const T* x, const T* shift, const T* scale, T* out, int64_t batch,
                                    int64_t tokens, int dim, float eps) {
  __shared__ float red[32];
  constexpr int V = 16 / sizeof(T);
  const int64_t rows = batch * tokens;
  if (dim % V == 0 && aligned16(x) && aligned16(shift) && aligned16(scale) && aligned16(out))
    adaln_rows<T, V, false>(x, nullptr, nullptr, shift, scale, nullptr, out, rows, tokens, dim, eps, red);
  else
    adaln_rows<T, 1, false>(x, nullptr, nullptr, shift, scale, nullptr, out, rows, tokens, dim, eps, red);
}

// h = residual + gate * y and out = adaln_modulate(h); residual, y, h, out (batch, tokens, dim);
// gate, shift, scale (batch, dim); all contiguous.
template <typename T>
__device__ void adaln_modulate_residual_body(const T* residual, const T* y, const T* gate, const T* shift,
                                             const T* scale, T* h, T* out, int64_t batch, int64_t tokens, int dim,
                                             float eps) {
  __shared__ float red[32];
  constexpr int V = 16 / sizeof(T);
  const int64_t rows = batch * tokens;
  if (dim % V == 0 && aligned16(residual) && aligned16(y) && aligned16(gate) && aligned16(shift) &&
      aligned16(scale) && aligned16(h) && aligned16(out))
    adaln_rows<T, V, true>(residual, y, gate, shift, scale, h, out, rows, tokens, dim, eps, red);
  else
    adaln_rows<T, 1, true>(residual, y, gate, shift, scale, h, out, rows, tokens, dim, eps, red);
}

}  // namespace dit
