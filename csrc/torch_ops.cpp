// The dit ops as C++ torch ops (namespace ditrt), so that AOTInductor packages calling them also run from the C++
// loader (torch::inductor::AOTIModelPackageLoader), where Python-registered ops do not exist.
//
//   ditrt::adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor
//   ditrt::adaln_modulate_residual(Tensor residual, Tensor y, Tensor gate, Tensor shift, Tensor scale,
//                                  float eps) -> (Tensor, Tensor)
//   ditrt::linear_attention(Tensor q, Tensor k, Tensor v, float eps) -> Tensor
//
// Same semantics as the plain-torch references in export/ops/*.py (the ground truth):
// - CUDA: the csrc/ kernels through the C ABI of dit_kernels.h (libditkernels.so), on the current stream; inputs
//   the kernels do not cover (dtypes other than fp32/fp16/bf16, empty tensors, D above the kernel limit, head dims
//   above 64) and a CUDA runtime that cannot use the GPU (one warning) go to the reference maths, as in
//   export/kernels/torch_ops.py.
// - CPU: the reference maths in ATen, with the same ops in the same order as the Python references (fp32
//   statistics and sums, cast back to the input dtype).
// - Meta: shapes for torch.export / AOTInductor (symbolic sizes allowed).
// Every output is contiguous. Inconsistent inputs raise a c10::Error (RuntimeError in Python) naming the op.
// Registered when the library is loaded, like TORCH_LIBRARY(ditrt, m) + TORCH_LIBRARY_IMPL(ditrt, CPU/CUDA/Meta, m),
// except that a second copy loaded into the same process registers nothing (see Registration at the end).
//
// Built by export/kernels/cpp_ops.py against the installed torch (C++20, as torch's headers need); needs no CUDA
// torch headers (the stream comes from c10's device guard interface), so it compiles against a CPU-only libtorch
// too. Links libditkernels.so, found beside this library (RUNPATH $ORIGIN).

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/layer_norm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/SymBool.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "dit_kernels.h"

namespace {

using at::Tensor;

struct Named {
  const char* name;
  const Tensor& tensor;
};

// ---- input checks, shared by the CPU, CUDA and Meta kernels (sizes may be symbolic under Meta) ----

void check_same(const char* op, std::initializer_list<Named> inputs) {
  const Named& first = *inputs.begin();
  for (const Named& in : inputs) {
    TORCH_CHECK(in.tensor.device() == first.tensor.device(), op, ": ", in.name, " is on ", in.tensor.device(),
                " but ", first.name, " on ", first.tensor.device(), "; move all inputs to one device");
    TORCH_CHECK(in.tensor.scalar_type() == first.tensor.scalar_type(), op, ": ", in.name, " is ",
                in.tensor.scalar_type(), " but ", first.name, " ", first.tensor.scalar_type(),
                "; cast all inputs to one dtype");
  }
}

// x (B, N, D) and rows (B, D).
void check_modulation(const char* op, const Named& x, std::initializer_list<Named> rows) {
  TORCH_CHECK(x.tensor.dim() == 3, op, ": expected ", x.name, " of shape (B, N, D), got ", x.tensor.sym_sizes());
  const c10::SymInt B = x.tensor.sym_size(0), D = x.tensor.sym_size(2);
  for (const Named& row : rows) {
    TORCH_CHECK(row.tensor.dim() == 2, op, ": ", row.name, " must be (B, D) = (", B, ", ", D, "), got ",
                row.tensor.sym_sizes());
    TORCH_SYM_CHECK(row.tensor.sym_size(0).sym_eq(B) & row.tensor.sym_size(1).sym_eq(D), op, ": ", row.name,
                    " must be (B, D) = (", B, ", ", D, "), got ", row.tensor.sym_sizes());
  }
}

void check_adaln(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  const char* op = "ditrt::adaln_modulate";
  check_same(op, {{"x", x}, {"shift", shift}, {"scale", scale}});
  check_modulation(op, {"x", x}, {{"shift", shift}, {"scale", scale}});
}

void check_adaln_residual(const Tensor& residual, const Tensor& y, const Tensor& gate, const Tensor& shift,
                          const Tensor& scale) {
  const char* op = "ditrt::adaln_modulate_residual";
  check_same(op, {{"residual", residual}, {"y", y}, {"gate", gate}, {"shift", shift}, {"scale", scale}});
  check_modulation(op, {"residual", residual}, {{"gate", gate}, {"shift", shift}, {"scale", scale}});
  TORCH_CHECK(y.dim() == 3, op, ": y must have the shape of residual ", residual.sym_sizes(), ", got ",
              y.sym_sizes());
  for (int64_t i = 0; i < 3; ++i) {
    TORCH_SYM_CHECK(y.sym_size(i).sym_eq(residual.sym_size(i)), op, ": y must have the shape of residual ",
                    residual.sym_sizes(), ", got ", y.sym_sizes());
  }
}

void check_linear_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* op = "ditrt::linear_attention";
  check_same(op, {{"q", q}, {"k", k}, {"v", v}});
  bool ranks = q.dim() == 4 && k.dim() == 4 && v.dim() == 4;
  TORCH_CHECK(ranks, op, ": q, k, v must share one (B, H, N, d) shape, got ", q.sym_sizes(), ", ", k.sym_sizes(),
              ", ", v.sym_sizes());
  for (int64_t i = 0; i < 4; ++i) {
    TORCH_SYM_CHECK(k.sym_size(i).sym_eq(q.sym_size(i)) & v.sym_size(i).sym_eq(q.sym_size(i)), op,
                    ": q, k, v must share one (B, H, N, d) shape, got ", q.sym_sizes(), ", ", k.sym_sizes(), ", ",
                    v.sym_sizes());
  }
}

// ---- the reference maths: export/ops/*.py `reference`, op for op (any device) ----

Tensor adaln_reference(const Tensor& x, const Tensor& shift, const Tensor& scale, double eps) {
  Tensor y = at::layer_norm(x.to(at::kFloat), {x.size(-1)}, {}, {}, eps);
  Tensor out = y * (scale.to(at::kFloat).unsqueeze(1) + 1) + shift.to(at::kFloat).unsqueeze(1);
  return out.to(x.scalar_type()).contiguous();
}

std::tuple<Tensor, Tensor> adaln_residual_reference(const Tensor& residual, const Tensor& y, const Tensor& gate,
                                                    const Tensor& shift, const Tensor& scale, double eps) {
  Tensor h = (residual.to(at::kFloat) + gate.to(at::kFloat).unsqueeze(1) * y.to(at::kFloat))
                 .to(residual.scalar_type())
                 .contiguous();
  return {h, adaln_reference(h, shift, scale, eps)};
}

Tensor linear_attention_reference(const Tensor& q, const Tensor& k, const Tensor& v, double eps) {
  Tensor qf = q.relu().to(at::kFloat), kf = k.relu().to(at::kFloat), vf = v.to(at::kFloat);
  Tensor kv = kf.transpose(-1, -2).matmul(vf);                    // (B, H, d, d)
  Tensor num = qf.matmul(kv);                                     // (B, H, N, d)
  Tensor den = qf.matmul(kf.sum(at::IntArrayRef{2}).unsqueeze(-1));  // (B, H, N, 1)
  return (num / den.clamp_min(eps)).to(q.scalar_type()).contiguous();
}

// ---- CPU ----

Tensor adaln_modulate_cpu(const Tensor& x, const Tensor& shift, const Tensor& scale, double eps) {
  check_adaln(x, shift, scale);
  return adaln_reference(x, shift, scale, eps);
}

std::tuple<Tensor, Tensor> adaln_modulate_residual_cpu(const Tensor& residual, const Tensor& y, const Tensor& gate,
                                                       const Tensor& shift, const Tensor& scale, double eps) {
  check_adaln_residual(residual, y, gate, shift, scale);
  return adaln_residual_reference(residual, y, gate, shift, scale, eps);
}

Tensor linear_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, double eps) {
  check_linear_attention(q, k, v);
  return linear_attention_reference(q, k, v, eps);
}

// ---- CUDA: the kernels of libditkernels.so ----

constexpr int64_t kLAMaxHeadDim = 64;  // dit_linear_attention's limit

// The dtype code of dit_kernels.h, or -1 for a dtype the kernels do not take.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DIT_FP32;
    case at::kHalf: return DIT_FP16;
    case at::kBFloat16: return DIT_BF16;
    default: return -1;
  }
}

// adaln_max_dim in csrc: each of at most 1024 threads holds 32 bytes of a row.
int64_t adaln_max_dim(at::ScalarType t) {
  return 1024 * 32 / static_cast<int64_t>(c10::elementSize(t));
}

// True once this library's CUDA runtime has accepted the (current) device; else one warning and false for good.
bool kernels_usable() {
  static std::once_flag once;
  static int code = 0;
  std::call_once(once, [] { code = dit_runtime_check(); });
  if (code != 0) {
    TORCH_WARN_ONCE("ditrt ops: libditkernels cannot use this GPU: ", dit_error_string(code), " (cudaError ",
                    code, "); the ops use the torch reference. Build the kernels with a CUDA toolkit no newer "
                    "than the driver");
  }
  return code == 0;
}

// The current CUDA stream of t's device, through c10's device guard interface (no CUDA torch headers needed).
cudaStream_t current_stream(const Tensor& t) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStreamNativeHandle(impl->getStream(t.device())));
}

void check_call(const char* op, const char* fn, int code) {
  TORCH_CHECK(code == 0, op, ": ", fn, " failed: ", dit_error_string(code), " (cudaError ", code, ")");
}

Tensor adaln_modulate_cuda(const Tensor& x_in, const Tensor& shift_in, const Tensor& scale_in, double eps) {
  check_adaln(x_in, shift_in, scale_in);
  c10::DeviceGuard guard(x_in.device());
  int dtype = dtype_code(x_in.scalar_type());
  if (dtype < 0 || x_in.numel() == 0 || x_in.size(2) > adaln_max_dim(x_in.scalar_type()) || !kernels_usable()) {
    return adaln_reference(x_in, shift_in, scale_in, eps);
  }
  Tensor x = x_in.contiguous(), shift = shift_in.contiguous(), scale = scale_in.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  check_call("ditrt::adaln_modulate", "dit_adaln_modulate",
             dit_adaln_modulate(x.const_data_ptr(), shift.const_data_ptr(), scale.const_data_ptr(),
                                out.mutable_data_ptr(), x.size(0), x.size(1), x.size(2), static_cast<float>(eps),
                                dtype, current_stream(x)));
  return out;
}

std::tuple<Tensor, Tensor> adaln_modulate_residual_cuda(const Tensor& residual_in, const Tensor& y_in,
                                                        const Tensor& gate_in, const Tensor& shift_in,
                                                        const Tensor& scale_in, double eps) {
  check_adaln_residual(residual_in, y_in, gate_in, shift_in, scale_in);
  c10::DeviceGuard guard(residual_in.device());
  at::ScalarType type = residual_in.scalar_type();
  int dtype = dtype_code(type);
  if (dtype < 0 || residual_in.numel() == 0 || residual_in.size(2) > adaln_max_dim(type) || !kernels_usable()) {
    return adaln_residual_reference(residual_in, y_in, gate_in, shift_in, scale_in, eps);
  }
  Tensor residual = residual_in.contiguous(), y = y_in.contiguous(), gate = gate_in.contiguous();
  Tensor shift = shift_in.contiguous(), scale = scale_in.contiguous();
  Tensor h = at::empty(residual.sizes(), residual.options());
  Tensor out = at::empty(residual.sizes(), residual.options());
  check_call("ditrt::adaln_modulate_residual", "dit_adaln_modulate_residual",
             dit_adaln_modulate_residual(residual.const_data_ptr(), y.const_data_ptr(), gate.const_data_ptr(),
                                         shift.const_data_ptr(), scale.const_data_ptr(), h.mutable_data_ptr(),
                                         out.mutable_data_ptr(), residual.size(0), residual.size(1),
                                         residual.size(2), static_cast<float>(eps), dtype,
                                         current_stream(residual)));
  return {h, out};
}

Tensor linear_attention_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double eps) {
  check_linear_attention(q_in, k_in, v_in);
  c10::DeviceGuard guard(q_in.device());
  int dtype = dtype_code(q_in.scalar_type());
  if (dtype < 0 || q_in.numel() == 0 || q_in.size(3) > kLAMaxHeadDim || !kernels_usable()) {
    return linear_attention_reference(q_in, k_in, v_in, eps);
  }
  Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  // The split path's fp32 partial states; the caching allocator keeps the block for this stream's work.
  size_t need = dit_linear_attention_workspace_size(B, H, N, d);
  Tensor work;
  if (need > 0) {
    work = at::empty({static_cast<int64_t>(need)}, q.options().dtype(at::kByte));
  }
  check_call("ditrt::linear_attention", "dit_linear_attention",
             dit_linear_attention(q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), out.mutable_data_ptr(),
                                  B, H, N, d, static_cast<float>(eps), dtype,
                                  need > 0 ? work.mutable_data_ptr() : nullptr, need, current_stream(q)));
  return out;
}

// ---- Meta: contiguous outputs of the input's shape ----

Tensor adaln_modulate_meta(const Tensor& x, const Tensor& shift, const Tensor& scale, double) {
  check_adaln(x, shift, scale);
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<Tensor, Tensor> adaln_modulate_residual_meta(const Tensor& residual, const Tensor& y, const Tensor& gate,
                                                        const Tensor& shift, const Tensor& scale, double) {
  check_adaln_residual(residual, y, gate, shift, scale);
  return {at::empty_symint(residual.sym_sizes(), residual.options()),
          at::empty_symint(residual.sym_sizes(), residual.options())};
}

Tensor linear_attention_meta(const Tensor& q, const Tensor& k, const Tensor& v, double) {
  check_linear_attention(q, k, v);
  return at::empty_symint(q.sym_sizes(), q.options());
}

// ---- registration ----

void define(torch::Library& m) {
  // pt2_compliant: functional, with Meta kernels, so torch.export and Inductor may trace them.
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor", tags);
  m.def("adaln_modulate_residual(Tensor residual, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps)"
        " -> (Tensor, Tensor)",
        tags);
  m.def("linear_attention(Tensor q, Tensor k, Tensor v, float eps) -> Tensor", tags);
}

void impl_cpu(torch::Library& m) {
  m.impl("adaln_modulate", &adaln_modulate_cpu);
  m.impl("adaln_modulate_residual", &adaln_modulate_residual_cpu);
  m.impl("linear_attention", &linear_attention_cpu);
}

void impl_cuda(torch::Library& m) {
  m.impl("adaln_modulate", &adaln_modulate_cuda);
  m.impl("adaln_modulate_residual", &adaln_modulate_residual_cuda);
  m.impl("linear_attention", &linear_attention_cuda);
}

void impl_meta(torch::Library& m) {
  m.impl("adaln_modulate", &adaln_modulate_meta);
  m.impl("adaln_modulate_residual", &adaln_modulate_residual_meta);
  m.impl("linear_attention", &linear_attention_meta);
}

// What TORCH_LIBRARY(ditrt, m) and TORCH_LIBRARY_IMPL(ditrt, CPU/CUDA/Meta, m) do at load time, except that a
// second copy of this library loaded into one process (an engine folder's copy after the build cache's, two
// folders' copies) registers nothing and the first copy serves: the macros would throw "Only a single
// TORCH_LIBRARY can be used to register the namespace ditrt" from a static initializer, which aborts the process.
// The registrations live as long as the library stays loaded.
class Registration {
 public:
  Registration() {
    if (c10::Dispatcher::singleton().findSchema({"ditrt::adaln_modulate", ""}).has_value()) {
      return;
    }
    try {
      add(torch::Library::DEF, std::nullopt, define);
      add(torch::Library::IMPL, c10::DispatchKey::CPU, impl_cpu);
      add(torch::Library::IMPL, c10::DispatchKey::CUDA, impl_cuda);
      add(torch::Library::IMPL, c10::DispatchKey::Meta, impl_meta);
    } catch (const c10::Error& e) {  // e.g. something else defined the namespace: no abort, the ops are missing
      libraries_.clear();
      TORCH_WARN("ditrt ops not registered: ", e.what_without_backtrace());
    }
  }

 private:
  void add(torch::Library::Kind kind, std::optional<c10::DispatchKey> key, void (*init)(torch::Library&)) {
    libraries_.push_back(std::make_unique<torch::Library>(kind, "ditrt", key, __FILE__, __LINE__));
    init(*libraries_.back());
  }

  std::vector<std::unique_ptr<torch::Library>> libraries_;
};

const Registration registration;

}  // namespace
