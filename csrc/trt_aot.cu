// Entry points of the TensorRT AOT plugins (export/trt/plugins.py): its PTX is embedded in the engines.
//
// TensorRT launches an AOT plugin kernel with, in this order: the input pointers, the int32 scalars that aot_impl
// returned ("extra args"), then the output pointers. Scalars can only be int32, so eps travels as its float bits.
// Names: dit_<op>_<f32|f16|bf16>, linear attention with its head-dim bucket as _dk<8|16|32|64>.
// Launch contract (block, grid; no dynamic shared memory): csrc/README.md, mirrored in plugins.py.
// An engine embeds one entry per plugin layer, not this whole module: plugins.py compiles a two-line source that
// defines DIT_AOT_MACROS_ONLY, includes this file and expands the one macro it needs.
#include "adaln_modulate.cuh"
#include "linear_attention.cuh"

#define DIT_AOT_ADALN(SUFFIX, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(dit::kAdaLNMaxThreads) dit_adaln_modulate_##SUFFIX(              \
      const T* x, const T* shift, const T* scale, int batch, int tokens, int dim, int eps_bits, T* out) {       \
    dit::adaln_modulate_body<T>(x, shift, scale, out, batch, tokens, dim, __int_as_float(eps_bits));            \
  }

// Outputs h = residual + gate * y, then out = adaln_modulate(h), in this order.
#define DIT_AOT_ADALN_RESIDUAL(SUFFIX, T)                                                                         \
  extern "C" __global__ void __launch_bounds__(dit::kAdaLNMaxThreads) dit_adaln_modulate_residual_##SUFFIX(     \
      const T* residual, const T* y, const T* gate, const T* shift, const T* scale, int batch, int tokens,      \
      int dim, int eps_bits, T* h, T* out) {                                                                    \
    dit::adaln_modulate_residual_body<T>(residual, y, gate, shift, scale, h, out, batch, tokens, dim,           \
                                         __int_as_float(eps_bits));                                             \
  }

// One CTA per (batch, head) slab: grid.x = batch * heads.
#define DIT_AOT_LA(SUFFIX, T, DK)                                                                                 \
  extern "C" __global__ void __launch_bounds__(dit::kLAThreads) dit_linear_attention_##SUFFIX##_dk##DK(         \
      const T* q, const T* k, const T* v, int tokens, int head_dim, int eps_bits, T* out) {                     \
    dit::linear_attention_fused<T, DK>(q, k, v, out, tokens, head_dim, __int_as_float(eps_bits));               \
  }

#ifndef DIT_AOT_MACROS_ONLY
#define DIT_AOT_OPS(SUFFIX, T)      \
  DIT_AOT_ADALN(SUFFIX, T)          \
  DIT_AOT_ADALN_RESIDUAL(SUFFIX, T) \
  DIT_AOT_LA(SUFFIX, T, 8)          \
  DIT_AOT_LA(SUFFIX, T, 16)         \
  DIT_AOT_LA(SUFFIX, T, 32)         \
  DIT_AOT_LA(SUFFIX, T, 64)

DIT_AOT_OPS(f32, float)
DIT_AOT_OPS(f16, __half)
DIT_AOT_OPS(bf16, __nv_bfloat16)
#endif
