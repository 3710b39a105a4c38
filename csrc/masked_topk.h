// Masked global top-k: declarations shared by the CPU op (masked_topk.cpp, with its paths in
// masked_topk_bracket.cpp and masked_topk_radix.cpp), the CUDA op (cuda/masked_topk_cuda.cu)
// and the C++ test.
//
// Ops (namespace ntksap_fast, schemas in masked_topk.cpp):
//   masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)  (new mask, status)
//   masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor       (status; mask
//                                                                            overwritten)
// Keep exactly n_keep entries among mask == True: the largest scores, ties broken by the lower
// index, -0.0 == 0.0, +-inf ordinary.
//
// Errors that depend on the data are not thrown: the ops return a status, an int64 CPU tensor
// [count, nan] (count = number of unpruned entries, nan = 1 if a NaN score sits at an unpruned
// entry, else 0). The result is valid iff nan == 0 and n_keep <= count; otherwise the in-place
// op leaves mask unchanged and the out-of-place op returns an all-False mask, and the Python
// wrapper (ntksap_fast/topk.py) raises the ValueError. Only argument errors that need no data
// are thrown (TORCH_CHECK): wrong dtypes (TypeError), shapes, devices, n_keep < 0 (ValueError).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ntksap_fast {

// Outcome of one selection (the status tensor's two entries).
struct TopKStatus {
  int64_t count = 0;  // unpruned entries
  bool nan = false;   // a NaN score at an unpruned entry
  bool ok(int64_t n_keep) const { return !nan && n_keep <= count; }
};

// Dtype / shape / device / sign-of-n_keep checks common to every backend (throws
// c10::TypeError / c10::ValueError).
void check_topk_inputs(const at::Tensor& scores, const at::Tensor& mask, int64_t n_keep);

// The status as returned by the ops: int64 CPU tensor [count, nan].
at::Tensor status_tensor(const TopKStatus& st);

std::tuple<at::Tensor, at::Tensor> masked_topk_cpu(const at::Tensor& scores, const at::Tensor& mask,
                                                   int64_t n_keep);
at::Tensor masked_topk_cpu_(const at::Tensor& scores, at::Tensor& mask, int64_t n_keep);

}  // namespace ntksap_fast
