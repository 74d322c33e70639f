// dit::linear_attention bodies (Sana's ReLU linear attention). Launch contract: csrc/README.md.
//
//   state = relu(k)^T [v | 1]      (DK x DV, fp32): columns < d hold sum_m relu(k_m) v_m^T, column DK sum_m relu(k_m)
//   o_n   = relu(q_n)^T state      (DV): numerator in columns < d, denominator in column DK
//   out_n = o_n[:d] / max(o_n[DK], eps)
//
// Both passes are small GEMMs on CUDA cores with 4x4 register blocks over fp32 tiles in shared memory; the next
// token tile is loaded into registers while the current one is computed. Nothing N x N is ever formed.
#pragma once

#include "dit_common.cuh"

namespace dit {

constexpr int kLAThreads = 288;         // 9 warps: a whole number of 4x4 state blocks for every DK bucket
constexpr int kLAMaxHeadDim = 64;
constexpr int kLATileFloats = 7424;     // token tile: relu(k) | [v 1] in pass 1, relu(q)^T then o in pass 2
constexpr int kLAStateFloats = 4608;    // per-group partial states, then the summed state

// Head dims are padded to a bucket DK in {8, 16, 32, 64}; padded q/k/v columns are zeros.
__host__ __device__ constexpr int la_bucket(int64_t d) { return d <= 8 ? 8 : d <= 16 ? 16 : d <= 32 ? 32 : 64; }

template <int DK> struct LAShape {
  static constexpr int DV = DK + 4;                 // v, zero padding, then the ones column at DK
  static constexpr int CB = DV / 4;                 // 4-wide column blocks of the state
  static constexpr int NB = DK / 4 * CB;            // 4x4 blocks of the state
  static constexpr int G = kLAThreads / NB;         // token groups summing state blocks in pass 1
  static constexpr int T1 = kLATileFloats / (DK + DV) / 8 * 8;  // tokens per pass-1 tile
  static constexpr int T2 = kLAThreads / CB * 4;    // tokens per pass-2 tile: 4 per thread
  static_assert(G >= 1 && G * DK * DV <= kLAStateFloats, "pass-1 partial states must fit");
  static_assert(T2 * DV <= kLATileFloats && T2 * DK <= kLATileFloats, "pass-2 tile must fit");
};

// A tile of TOK tokens x DK (padded) elements of one (b, h) slab, held in registers as raw packs so that the
// loads stay in flight while the previous tile is computed. Pack p covers tile elements [p*V, p*V + V).
template <typename T, int DK, int TOK> struct LATile {
  static constexpr int V = 16 / int(sizeof(T));
  static constexpr int PACKS = TOK * DK / V;
  static constexpr int S = (PACKS + kLAThreads - 1) / kLAThreads;
  static_assert(DK % V == 0, "a pack never crosses a token");
  Pack<T, V> raw[S];

  // vec: d == DK and 16-byte aligned slab, so a pack is one 16-byte load; otherwise element loads with d guards.
  __device__ __forceinline__ void load(const T* src, int64_t n0, int64_t n_end, int d, bool vec) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int p = threadIdx.x + s * kLAThreads;
      const int t = p * V / DK, i = p * V % DK;
      const int64_t n = n0 + t;
      if (p < PACKS && n < n_end && vec) {
        raw[s] = *reinterpret_cast<const Pack<T, V>*>(src + n * DK + i);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          raw[s].v[e] = p < PACKS && n < n_end && i + e < d ? src[n * d + i + e] : from_float<T>(0.f);
      }
    }
  }

  // dst[t * row_stride + i * col_stride] = element (t, i), relu'd if asked; with ones, dst[t * row_stride + DK..+3]
  // = {1, 0, 0, 0} (the augmented columns of v).
  __device__ __forceinline__ void stash(float* dst, int row_stride, int col_stride, bool relu, bool ones) const {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int p = threadIdx.x + s * kLAThreads;
      if (p >= PACKS) continue;
      const int t = p * V / DK, i = p * V % DK;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float f = to_float(raw[s].v[e]);
        dst[t * row_stride + (i + e) * col_stride] = relu ? (f > 0.f ? f : 0.f) : f;
      }
      if (ones && i == 0) {
        dst[t * row_stride + DK] = 1.f;
        dst[t * row_stride + DK + 1] = dst[t * row_stride + DK + 2] = dst[t * row_stride + DK + 3] = 0.f;
      }
    }
  }
};

__device__ __forceinline__ void outer4(float (&acc)[4][4], const float4 a, const float4 b) {
  const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
}

// Pass 1: state[0 .. DK*DV) = relu(k)^T [v | 1] over tokens [n_begin, n_end) of one slab. Ends with a sync.
template <typename T, int DK>
__device__ void la_state(const T* k, const T* v, int64_t n_begin, int64_t n_end, int d, bool vec, float* tile,
                         float* state) {
  using S = LAShape<DK>;
  float* ks = tile;               // (T1, DK)
  float* vs = tile + S::T1 * DK;  // (T1, DV)
  const int g = threadIdx.x / S::NB, blk = threadIdx.x % S::NB;
  const int r0 = blk / S::CB * 4, c0 = blk % S::CB * 4;
  float acc[4][4] = {};
  LATile<T, DK, S::T1> lk, lv;
  lk.load(k, n_begin, n_end, d, vec);
  lv.load(v, n_begin, n_end, d, vec);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += S::T1) {
    __syncthreads();  // the previous tile is consumed
    lk.stash(ks, DK, 1, true, false);
    lv.stash(vs, S::DV, 1, false, true);
    __syncthreads();
    if (n0 + S::T1 < n_end) {
      lk.load(k, n0 + S::T1, n_end, d, vec);
      lv.load(v, n0 + S::T1, n_end, d, vec);
    }
    const int tn = int(n_end - n0 < S::T1 ? n_end - n0 : S::T1);
    if (g < S::G) {
      for (int t = g; t < tn; t += S::G)
        outer4(acc, *reinterpret_cast<const float4*>(ks + t * DK + r0),
               *reinterpret_cast<const float4*>(vs + t * S::DV + c0));
    }
  }
  __syncthreads();  // state may still be read by a previous pass
  if (g < S::G) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) state[g * DK * S::DV + (r0 + r) * S::DV + c0 + c] = acc[r][c];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < DK * S::DV; e += kLAThreads) {
    float s = 0.f;
    for (int gg = 0; gg < S::G; ++gg) s += state[gg * DK * S::DV + e];  // gg = 0 read first: in place is safe
    state[e] = s;
  }
  __syncthreads();
}

// Pass 2: out rows [n_begin, n_end) of one slab from the summed state.
template <typename T, int DK>
__device__ void la_apply(const T* q, T* out, int64_t n_begin, int64_t n_end, int d, bool vec, float eps,
                         float* tile, const float* state) {
  using S = LAShape<DK>;
  constexpr int T2 = S::T2, DV = S::DV, V = LATile<T, DK, T2>::V;
  const bool active = threadIdx.x < T2 / 4 * S::CB;
  const int t0 = threadIdx.x / S::CB * 4, c0 = threadIdx.x % S::CB * 4;
  LATile<T, DK, T2> lq;
  lq.load(q, n_begin, n_end, d, vec);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += T2) {
    __syncthreads();  // the previous tile's outputs are written
    lq.stash(tile, 1, T2, true, false);  // relu(q)^T: (DK, T2)
    __syncthreads();
    if (n0 + T2 < n_end) lq.load(q, n0 + T2, n_end, d, vec);
    float acc[4][4] = {};
    if (active) {
#pragma unroll 8
      for (int i = 0; i < DK; ++i)
        outer4(acc, *reinterpret_cast<const float4*>(tile + i * T2 + t0),
               *reinterpret_cast<const float4*>(state + i * DV + c0));
    }
    __syncthreads();  // relu(q)^T is consumed; the tile now holds o: (T2, DV)
    if (active) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) tile[(t0 + r) * DV + c0 + c] = acc[r][c];
    }
    __syncthreads();
    const int tn = int(n_end - n0 < T2 ? n_end - n0 : T2);
    if (vec) {
      for (int p = threadIdx.x; p < tn * DK / V; p += kLAThreads) {
        const int t = p * V / DK, i = p * V % DK;
        const float den = tile[t * DV + DK];
        const float clamped = den < eps ? eps : den;  // clamp_min: a NaN stays NaN
        float f[V];
#pragma unroll
        for (int e = 0; e < V; ++e) f[e] = tile[t * DV + i + e] / clamped;
        store_pack<T, V>(out + (n0 + t) * DK + i, f);
      }
    } else {
      for (int p = threadIdx.x; p < tn * d; p += kLAThreads) {
        const int t = p / d, i = p % d;
        const float den = tile[t * DV + DK];
        out[(n0 + t) * d + i] = from_float<T>(tile[t * DV + i] / (den < eps ? eps : den));
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ bool la_vec(int d, int dk, const T* a, const T* b, const void* c) {
  return d == dk && aligned16(a) && aligned16(b) && aligned16(c);
}

// Single kernel, no workspace: CTA blockIdx.x handles slab (b, h) = blockIdx.x of q, k, v, out (B, H, N, d).
template <typename T, int DK>
__device__ void linear_attention_fused(const T* q, const T* k, const T* v, T* out, int64_t tokens, int d,
                                       float eps) {
  __shared__ __align__(16) float tile[kLATileFloats];
  __shared__ __align__(16) float state[kLAStateFloats];
  const int64_t slab = int64_t(blockIdx.x) * tokens * d;
  const bool vec = la_vec(d, DK, q, k, v) && aligned16(out);
  la_state<T, DK>(k + slab, v + slab, 0, tokens, d, vec, tile, state);
  la_apply<T, DK>(q + slab, out + slab, 0, tokens, d, vec, eps, tile, state);
}

// Split path, kernel 1 of 2: CTA (blockIdx.x = slab, blockIdx.y = split) sums tokens [split*chunk, +chunk) into
// partial[slab][split] (DK x DV floats).
template <typename T, int DK>
__device__ void linear_attention_partial(const T* k, const T* v, float* partial, int64_t tokens, int d,
                                         int64_t chunk) {
  __shared__ __align__(16) float tile[kLATileFloats];
  __shared__ __align__(16) float state[kLAStateFloats];
  constexpr int SZ = DK * LAShape<DK>::DV;
  const int64_t slab = int64_t(blockIdx.x) * tokens * d;
  const int64_t n_begin = int64_t(blockIdx.y) * chunk;
  const int64_t n_end = n_begin + chunk < tokens ? n_begin + chunk : tokens;
  la_state<T, DK>(k + slab, v + slab, n_begin, n_end, d, la_vec(d, DK, k, v, k), tile, state);
  float* dst = partial + (int64_t(blockIdx.x) * gridDim.y + blockIdx.y) * SZ;
  for (int e = threadIdx.x; e < SZ; e += kLAThreads) dst[e] = state[e];
}

// Split path, kernel 2 of 2: CTA (blockIdx.x = slab, blockIdx.y = token chunk) sums the slab's `splits` partial
// states (in split order: deterministic), then writes out for tokens [blockIdx.y*chunk, +chunk).
template <typename T, int DK>
__device__ void linear_attention_apply(const T* q, const float* partial, T* out, int64_t tokens, int d, int splits,
                                       int64_t chunk, float eps) {
  __shared__ __align__(16) float tile[kLATileFloats];
  __shared__ __align__(16) float state[kLAStateFloats];
  constexpr int SZ = DK * LAShape<DK>::DV;
  const int64_t slab = int64_t(blockIdx.x) * tokens * d;
  const float* src = partial + int64_t(blockIdx.x) * splits * SZ;
  for (int e = threadIdx.x; e < SZ; e += kLAThreads) {
    float s = 0.f;
    for (int i = 0; i < splits; ++i) s += src[i * SZ + e];
    state[e] = s;
  }
  __syncthreads();
  const int64_t n_begin = int64_t(blockIdx.y) * chunk;
  const int64_t n_end = n_begin + chunk < tokens ? n_begin + chunk : tokens;
  la_apply<T, DK>(q + slab, out + slab, n_begin, n_end, d, la_vec(d, DK, q, out, q), eps, tile, state);
}

}  // namespace dit
