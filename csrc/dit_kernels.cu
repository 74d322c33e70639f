// Thin __global__ wrappers over the kernel bodies and the C ABI of dit_kernels.h.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "adaln_modulate.cuh"
#include "dit_kernels.h"
#include "linear_attention.cuh"

#define DIT_STR2(x) #x
#define DIT_STR(x) DIT_STR2(x)
#define DIT_ABI_VERSION 1

namespace ditk {

template <typename T>
__global__ void __launch_bounds__(dit::kAdaLNMaxThreads)
    adaln_modulate_kernel(const T* x, const T* shift, const T* scale, T* out, int64_t batch, int64_t tokens,
                          int dim, float eps) {
  dit::adaln_modulate_body<T>(x, shift, scale, out, batch, tokens, dim, eps);
}

template <typename T>
__global__ void __launch_bounds__(dit::kAdaLNMaxThreads)
    adaln_modulate_residual_kernel(const T* residual, const T* y, const T* gate, const T* shift, const T* scale,
                                   T* h, T* out, int64_t batch, int64_t tokens, int dim, float eps) {
  dit::adaln_modulate_residual_body<T>(residual, y, gate, shift, scale, h, out, batch, tokens, dim, eps);
}

template <typename T, int DK>
__global__ void __launch_bounds__(dit::kLAThreads)
    linear_attention_kernel(const T* q, const T* k, const T* v, T* out, int64_t tokens, int d, float eps) {
  dit::linear_attention_fused<T, DK>(q, k, v, out, tokens, d, eps);
}

template <typename T, int DK>
__global__ void __launch_bounds__(dit::kLAThreads)
    linear_attention_partial_kernel(const T* k, const T* v, float* partial, int64_t tokens, int d, int64_t chunk) {
  dit::linear_attention_partial<T, DK>(k, v, partial, tokens, d, chunk);
}

template <typename T, int DK>
__global__ void __launch_bounds__(dit::kLAThreads)
    linear_attention_apply_kernel(const T* q, const float* partial, T* out, int64_t tokens, int d, int splits,
                                  int64_t chunk, float eps) {
  dit::linear_attention_apply<T, DK>(q, partial, out, tokens, d, splits, chunk, eps);
}

template <typename F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case DIT_FP32: return f(float{});
    case DIT_FP16: return f(__half{});
    case DIT_BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
auto with_bucket(int64_t head_dim, F&& f) {
  switch (dit::la_bucket(head_dim)) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
  }
  return f(std::integral_constant<int, 64>{});
}

int elem_bytes(int dtype) { return dtype == DIT_FP32 ? 4 : 2; }

bool adaln_sizes_ok(int64_t batch, int64_t tokens, int64_t dim, int dtype) {
  if (dtype < DIT_FP32 || dtype > DIT_BF16 || batch < 0 || tokens < 0) return false;
  if (dim < 1 || dim > dit::adaln_max_dim(elem_bytes(dtype))) return false;
  if (batch > 0 && tokens > INT64_MAX / dim / batch) return false;
  const int ty = dit::adaln_rows_per_block(dit::adaln_threads_x(dim, elem_bytes(dtype)));
  return (batch * tokens + ty - 1) / ty <= INT_MAX;
}

template <typename T, typename Kernel, typename... Args>
int launch_adaln(Kernel kernel, int64_t batch, int64_t tokens, int64_t dim, cudaStream_t stream, Args... args) {
  const int tx = dit::adaln_threads_x(dim, sizeof(T)), ty = dit::adaln_rows_per_block(tx);
  const dim3 grid(unsigned((batch * tokens + ty - 1) / ty)), block(tx, ty);
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}

// Split the token axis only while batch * heads CTAs leave SMs idle (4 CTAs per SM is the aim), and keep at least
// 2048 tokens per split so that writing and re-reading a partial state stays small next to the tokens themselves.
int la_splits(int64_t slabs, int64_t tokens, int64_t chunk) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  const int64_t want = (4 * int64_t(sms) + slabs - 1) / slabs;
  const int64_t s = std::min<int64_t>({want, tokens / 2048, 64});
  return s < 2 || (tokens + chunk - 1) / chunk > 65535 ? 1 : int(s);
}

template <int DK>
int64_t la_apply_chunk() { return 8 * dit::LAShape<DK>::T2; }  // tokens per CTA of the apply kernel

template <int DK>
int64_t la_state_floats() { return DK * dit::LAShape<DK>::DV; }

bool la_sizes_ok(int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim, int dtype) {
  if (dtype < DIT_FP32 || dtype > DIT_BF16 || batch < 0 || heads < 0 || tokens < 0) return false;
  if (head_dim < 1 || head_dim > dit::kLAMaxHeadDim) return false;
  if (batch > 0 && heads > INT_MAX / batch) return false;
  return batch * heads == 0 || tokens <= INT64_MAX / head_dim / (batch * heads);
}

}  // namespace ditk

extern "C" {

int dit_adaln_modulate(const void* x, const void* shift, const void* scale, void* out, int64_t batch,
                       int64_t tokens, int64_t dim, float eps, int dtype, cudaStream_t stream) {
  if (!ditk::adaln_sizes_ok(batch, tokens, dim, dtype)) return cudaErrorInvalidValue;
  if (batch * tokens == 0) return cudaSuccess;
  return ditk::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return ditk::launch_adaln<T>(ditk::adaln_modulate_kernel<T>, batch, tokens, dim, stream,
                                 static_cast<const T*>(x), static_cast<const T*>(shift),
                                 static_cast<const T*>(scale), static_cast<T*>(out), batch, tokens, int(dim), eps);
  });
}

int dit_adaln_modulate_residual(const void* residual, const void* y, const void* gate, const void* shift,
                                const void* scale, void* h, void* out, int64_t batch, int64_t tokens, int64_t dim,
                                float eps, int dtype, cudaStream_t stream) {
  if (!ditk::adaln_sizes_ok(batch, tokens, dim, dtype)) return cudaErrorInvalidValue;
  if (batch * tokens == 0) return cudaSuccess;
  return ditk::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return ditk::launch_adaln<T>(ditk::adaln_modulate_residual_kernel<T>, batch, tokens, dim, stream,
                                 static_cast<const T*>(residual), static_cast<const T*>(y),
                                 static_cast<const T*>(gate), static_cast<const T*>(shift),
                                 static_cast<const T*>(scale), static_cast<T*>(h), static_cast<T*>(out), batch,
                                 tokens, int(dim), eps);
  });
}

size_t dit_linear_attention_workspace_size(int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim) {
  if (!ditk::la_sizes_ok(batch, heads, tokens, head_dim, DIT_FP32) || batch * heads * tokens == 0) return 0;
  return ditk::with_bucket(head_dim, [&](auto dk) {
    constexpr int DK = decltype(dk)::value;
    const int64_t splits = ditk::la_splits(batch * heads, tokens, ditk::la_apply_chunk<DK>());
    return splits > 1 ? size_t(batch * heads * splits) * ditk::la_state_floats<DK>() * sizeof(float) : size_t(0);
  });
}

int dit_linear_attention(const void* q, const void* k, const void* v, void* out, int64_t batch, int64_t heads,
                         int64_t tokens, int64_t head_dim, float eps, int dtype, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  if (!ditk::la_sizes_ok(batch, heads, tokens, head_dim, dtype)) return cudaErrorInvalidValue;
  if (batch * heads * tokens == 0) return cudaSuccess;
  const size_t need = dit_linear_attention_workspace_size(batch, heads, tokens, head_dim);
  const bool split = workspace != nullptr && need > 0 && workspace_bytes >= need;
  return ditk::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return ditk::with_bucket(head_dim, [&](auto dk) {
      constexpr int DK = decltype(dk)::value;
      const T *qp = static_cast<const T*>(q), *kp = static_cast<const T*>(k), *vp = static_cast<const T*>(v);
      T* op = static_cast<T*>(out);
      const unsigned slabs = unsigned(batch * heads);
      const int d = int(head_dim);
      if (!split) {
        ditk::linear_attention_kernel<T, DK><<<slabs, dit::kLAThreads, 0, stream>>>(qp, kp, vp, op, tokens, d, eps);
        return int(cudaGetLastError());
      }
      const int64_t chunk = ditk::la_apply_chunk<DK>();
      const int splits = ditk::la_splits(batch * heads, tokens, chunk);
      const int64_t split_chunk = (tokens + splits - 1) / splits;
      float* partial = static_cast<float*>(workspace);
      ditk::linear_attention_partial_kernel<T, DK><<<dim3(slabs, unsigned(splits)), dit::kLAThreads, 0, stream>>>(
          kp, vp, partial, tokens, d, split_chunk);
      const unsigned chunks = unsigned((tokens + chunk - 1) / chunk);
      ditk::linear_attention_apply_kernel<T, DK><<<dim3(slabs, chunks), dit::kLAThreads, 0, stream>>>(
          qp, partial, op, tokens, d, splits, chunk, eps);
      return int(cudaGetLastError());
    });
  });
}

int dit_runtime_check(void) { return cudaFree(nullptr); }

const char* dit_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

const char* dit_kernels_version(void) {
  return "ditrt-kernels " DIT_STR(DIT_ABI_VERSION) " (CUDA " DIT_STR(__CUDACC_VER_MAJOR__) "." DIT_STR(
      __CUDACC_VER_MINOR__) ")";
}

}  // extern "C"
