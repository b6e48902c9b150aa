// Torch operator registration for the WKV-7 kernels in wkv7.cu.
//
// Registered as torch.ops.<VRWKV_NS>.forward / .backward (a namespace per build, so builds for
// different dtypes or sizes can live in one process). Callers allocate every output, so
// vrwkv_core/kernels/cuda.py decides how they are initialised (NaN-poisoned in debug mode).
// Only light torch headers are included: this file compiles in a few seconds, unlike one
// built on torch/extension.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "wkv7.h"

#ifndef VRWKV_NS
#define VRWKV_NS vrwkv_wkv7
#endif
// Expands VRWKV_NS before TORCH_LIBRARY pastes and stringifies it.
#define VRWKV_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define VRWKV_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace {

constexpr auto kElem = VRWKV_BF16 ? at::kBFloat16 : at::kFloat;
constexpr int64_t kN = VRWKV_N;

void check_seq(const at::Tensor& x, const char* name, const at::Tensor& like, at::ScalarType dtype) {
  TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), "wkv7: ", name, " is on ", x.device(), ", expected ", like.device());
  TORCH_CHECK(x.scalar_type() == dtype, "wkv7: ", name, " has dtype ", x.scalar_type(), ", this build takes ", dtype);
  TORCH_CHECK(x.sizes() == like.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
}

void check_state(const at::Tensor& x, const char* name, const at::Tensor& like) {
  const auto B = like.size(0), H = like.size(2);
  TORCH_CHECK(x.is_cuda() && x.device() == like.device(), "wkv7: ", name, " must be on ", like.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv7: ", name, " must be float32");
  TORCH_CHECK(x.dim() == 4 && x.size(0) == B && x.size(1) == H && x.size(2) == kN && x.size(3) == kN, "wkv7: ",
              name, " has shape ", x.sizes(), ", expected [", B, ", ", H, ", ", kN, ", ", kN, "]");
  TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
}

void check_inputs(const at::Tensor& r) {
  TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B, T, H, N], got ", r.sizes());
  TORCH_CHECK(r.size(3) == kN, "wkv7: this build has head size ", kN, ", got ", r.size(3));
  TORCH_CHECK(r.size(1) >= 1, "wkv7: T must be >= 1");
  TORCH_CHECK(r.numel() < (int64_t(1) << 31) && r.size(0) * r.size(2) < (int64_t(1) << 31),
              "wkv7: inputs too large for one launch (", r.sizes(), ")");
}

void forward(const at::Tensor& r, const at::Tensor& log_w, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& s0, const at::Tensor& y,
             const at::Tensor& sT, const std::optional<at::Tensor>& ckpt, const std::optional<at::Tensor>& sa) {
  check_inputs(r);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  check_seq(r, "r", r, kElem);
  check_seq(log_w, "log_w", r, kElem);
  check_seq(k, "k", r, kElem);
  check_seq(v, "v", r, kElem);
  check_seq(a, "a", r, kElem);
  check_seq(b, "b", r, kElem);
  check_seq(y, "y", r, kElem);
  check_state(sT, "final state", r);
  if (s0.has_value()) check_state(*s0, "state", r);
  TORCH_CHECK(ckpt.has_value() == sa.has_value(), "wkv7: pass both ckpt and sa, or neither");
  if (ckpt.has_value()) {
    const int64_t nchunks = (T + VRWKV_C - 1) / VRWKV_C;
    TORCH_CHECK(ckpt->is_cuda() && ckpt->scalar_type() == at::kFloat && ckpt->is_contiguous() &&
                    ckpt->numel() == B * H * nchunks * kN * kN,
                "wkv7: ckpt must be a contiguous float32 CUDA tensor of ", B * H * nchunks * kN * kN, " elements");
    check_seq(*sa, "sa", r, at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(r.device());
  const cudaError_t err = vrwkv_wkv7_forward(
      int(B), int(T), int(H), r.data_ptr(), log_w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
      b.data_ptr(), s0.has_value() ? s0->data_ptr<float>() : nullptr, y.data_ptr(), sT.data_ptr<float>(),
      ckpt.has_value() ? ckpt->data_ptr<float>() : nullptr, sa.has_value() ? sa->data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv7 forward launch failed: ", cudaGetErrorString(err));
}

void backward(const at::Tensor& r, const at::Tensor& log_w, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& a, const at::Tensor& b, const at::Tensor& dy, const std::optional<at::Tensor>& dsT,
              const at::Tensor& ckpt, const at::Tensor& sa, bool zero_s0, const at::Tensor& dr,
              const at::Tensor& dlog_w, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& da,
              const at::Tensor& db, const at::Tensor& ds0) {
  check_inputs(r);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
  const int64_t nchunks = (T + VRWKV_C - 1) / VRWKV_C;
  const at::Tensor* seqs[] = {&r, &log_w, &k, &v, &a, &b, &dy, &dr, &dlog_w, &dk, &dv, &da, &db};
  const char* names[] = {"r", "log_w", "k", "v", "a", "b", "dy", "dr", "dlog_w", "dk", "dv", "da", "db"};
  for (int n = 0; n < 13; ++n) check_seq(*seqs[n], names[n], r, kElem);
  check_seq(sa, "sa", r, at::kFloat);
  check_state(ds0, "state gradient", r);
  if (dsT.has_value()) check_state(*dsT, "final state gradient", r);
  TORCH_CHECK(ckpt.is_cuda() && ckpt.scalar_type() == at::kFloat && ckpt.is_contiguous() &&
                  ckpt.numel() == B * H * nchunks * kN * kN,
              "wkv7: ckpt does not match the inputs (", ckpt.sizes(), ")");
  const c10::cuda::CUDAGuard guard(r.device());
  const cudaError_t err = vrwkv_wkv7_backward(
      int(B), int(T), int(H), r.data_ptr(), log_w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
      b.data_ptr(), dy.data_ptr(), dsT.has_value() ? dsT->data_ptr<float>() : nullptr, ckpt.data_ptr<float>(),
      sa.data_ptr<float>(), zero_s0, dr.data_ptr(), dlog_w.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
      db.data_ptr(), ds0.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wkv7 backward launch failed: ", cudaGetErrorString(err));
}

}  // namespace

VRWKV_LIBRARY(VRWKV_NS, m) {
  m.def(
      "forward(Tensor r, Tensor log_w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0, Tensor(a!) y, "
      "Tensor(b!) sT, Tensor(c!)? ckpt, Tensor(d!)? sa) -> ()");
  m.def(
      "backward(Tensor r, Tensor log_w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor? dsT, "
      "Tensor ckpt, Tensor sa, bool zero_s0, Tensor(a!) dr, Tensor(b!) dlog_w, Tensor(c!) dk, Tensor(d!) dv, "
      "Tensor(e!) da, Tensor(f!) db, Tensor(g!) ds0) -> ()");
}

VRWKV_LIBRARY_IMPL(VRWKV_NS, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
