/* C ABI of libditkernels: the dit:: custom ops on CUDA tensors given as device pointers.
 *
 * Tensors are contiguous, of one element type `dtype`: 0 fp32, 1 fp16, 2 bf16 (statistics and sums in fp32).
 * Every call is asynchronous on `stream` and returns a cudaError_t as int: 0 on success, cudaErrorInvalidValue (1)
 * for an unsupported dtype or size (nothing is launched), or the launch error. Zero rows/tokens launch nothing.
 */
#ifndef DIT_KERNELS_H
#define DIT_KERNELS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DIT_FP32 = 0, DIT_FP16 = 1, DIT_BF16 = 2 };

/* out (B, N, D) = LayerNorm_no_affine(x; eps) * (1 + scale[b]) + shift[b]; x (B, N, D), shift/scale (B, D).
 * 1 <= D <= 8192 (fp32) or 16384 (fp16, bf16). */
int dit_adaln_modulate(const void* x, const void* shift, const void* scale, void* out, int64_t batch,
                       int64_t tokens, int64_t dim, float eps, int dtype, cudaStream_t stream);

/* h = residual + gate[b] * y, then out = dit_adaln_modulate(h); residual/y/h/out (B, N, D), gate/shift/scale (B, D).
 * Same limits as dit_adaln_modulate. */
int dit_adaln_modulate_residual(const void* residual, const void* y, const void* gate, const void* shift,
                                const void* scale, void* h, void* out, int64_t batch, int64_t tokens, int64_t dim,
                                float eps, int dtype, cudaStream_t stream);

/* Bytes of fp32 workspace that make dit_linear_attention take the split path on the current device, or 0 when the
 * single kernel is the one to use (batch * heads already fills the GPU, or too few tokens to split). */
size_t dit_linear_attention_workspace_size(int64_t batch, int64_t heads, int64_t tokens, int64_t head_dim);

/* out_n = (sum_m v_m relu(k_m)^T) relu(q_n) / max(relu(q_n) . sum_m relu(k_m), eps); q/k/v/out (B, H, N, d),
 * 1 <= d <= 64. Split path (two kernels) when workspace_bytes >= dit_linear_attention_workspace_size(...) > 0,
 * otherwise one kernel and no workspace (workspace may be NULL). The workspace is 4-byte aligned device memory
 * that this call may overwrite and that must stay allocated until the call's work on `stream` is done. */
int dit_linear_attention(const void* q, const void* k, const void* v, void* out, int64_t batch, int64_t heads,
                         int64_t tokens, int64_t head_dim, float eps, int dtype, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

/* 0 when this library's CUDA runtime can use the current device, else the error (e.g. cudaErrorInsufficientDriver
 * when the driver is older than the toolkit that built the library). Creates the primary context if needed. */
int dit_runtime_check(void);

/* cudaGetErrorString of a code returned above. */
const char* dit_error_string(int code);

/* "ditrt-kernels <abi version> (CUDA <major>.<minor>)" */
const char* dit_kernels_version(void);

#ifdef __cplusplus
}
#endif

#endif /* DIT_KERNELS_H */
