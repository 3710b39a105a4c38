// Masked global top-k: declarations shared by the CPU op (masked_topk.cpp, with its paths in
// masked_topk_bracket.cpp and masked_topk_radix.cpp), the CUDA op (cuda/masked_topk_cuda.cu)
// and the C++ test.
//
// Ops (namespace ntksap_fast, schemas in masked_topk.cpp):
//   masked_topk(Tensor scores, Tensor mask, int n_keep) -> Tensor
//   masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> ()   (overwrites mask)
// Keep exactly n_keep entries among mask == True: the largest scores, ties broken by the lower
// index, -0.0 == 0.0, +-inf ordinary, NaN among unpruned entries -> ValueError, n_keep outside
// [0, mask.sum()] -> ValueError, wrong dtypes -> TypeError, wrong shapes/devices -> ValueError.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ntksap_fast {

// Dtype / shape / device checks common to every backend (throws c10::TypeError/ValueError).
void check_topk_inputs(const at::Tensor& scores, const at::Tensor& mask, int64_t n_keep);

// Throws the ValueError for n_keep outside [0, count].
void check_n_keep(int64_t n_keep, int64_t count);

// Throws the ValueError for a NaN at an unpruned entry.
[[noreturn]] void throw_nan_error();

at::Tensor masked_topk_cpu(const at::Tensor& scores, const at::Tensor& mask, int64_t n_keep);
void masked_topk_cpu_(const at::Tensor& scores, at::Tensor& mask, int64_t n_keep);

}  // namespace ntksap_fast
