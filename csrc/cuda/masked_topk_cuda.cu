// Masked global top-k, CUDA: the op entry points and their registration. Same semantics as the
// CPU op (see ../masked_topk.h); 64-bit indexing throughout; no sort and no copy of the scores.
//
// N >= 2^20: the bracketed fast path of masked_topk_fast.cu (one read of the scores, a few
// small kernels), then one device-to-host read of (count, NaN, mode): the status the API must
// return, and the rare cases settled here: an error or n_keep in {0, count} (mask put back /
// zeroed / copied); ties beyond what one block sorts at the threshold (mask put back, then the
// exact tie write); bracket missed or too many candidates (mask put back, then the exact radix
// select). Smaller N: the exact radix select of masked_topk_exact.cu.
#include "topk_cuda.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace ntksap_fast {
namespace cuda {
namespace {

constexpr int64_t kFastMinN = int64_t(1) << 20;

// scores, mask, out: contiguous CUDA tensors on one device; out may be mask itself.
template <typename Bits>
TopKStatus run(const at::Tensor& scores, const at::Tensor& mask, const at::Tensor& out, int64_t n_keep) {
  using Key = typename Bits::key_t;
  const int64_t n = scores.numel();
  const Key* s = static_cast<const Key*>(scores.const_data_ptr());
  const bool* m = mask.const_data_ptr<bool>();
  bool* o = out.mutable_data_ptr<bool>();
  if (n < kFastMinN || n >= (int64_t(1) << 47)) return exact_select<Bits>(s, m, o, n, n_keep, scores);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scores.get_device()).stream();
  const int sms = sm_count(scores.get_device());
  const bool in_place = o == m;
  const auto opts = scores.options();

  at::Tensor wst = at::zeros({kWords}, opts.dtype(at::kLong));
  ull* ws = reinterpret_cast<ull*>(wst.mutable_data_ptr<int64_t>());
  // Candidates: ~1.5% of n with 2^16 samples; room for n / 32 (more: the exact path).
  const int64_t cap = std::max<int64_t>(n / 32, int64_t(1) << 16);
  at::Tensor ckeys = at::empty({cap * static_cast<int64_t>(sizeof(Key))}, opts.dtype(at::kByte));
  at::Tensor cidxs = at::empty({cap}, opts.dtype(at::kLong));
  Key* ckey = reinterpret_cast<Key*>(ckeys.mutable_data_ptr<uint8_t>());
  int64_t* cidx = cidxs.mutable_data_ptr<int64_t>();
  at::Tensor backup_t;
  uint32_t* backup = nullptr;
  if (in_place) {
    backup_t = at::empty({(n + 31) / 32}, opts.dtype(at::kInt));
    backup = reinterpret_cast<uint32_t*>(backup_t.mutable_data_ptr<int32_t>());
  }

  fast_select<Bits>(s, m, o, backup, n, n_keep, ws, ckey, cidx, cap, sms, stream);

  // The one device-to-host read: status and what is left to do.
  const at::Tensor head = wst.narrow(0, 0, kHead).cpu();
  const int64_t* h = head.const_data_ptr<int64_t>();
  TopKStatus status;
  status.count = h[kCount];
  status.nan = h[kNan] != 0;
  const ull mode = static_cast<ull>(h[kMode]);
  if (mode == kModeDone || mode == kModeCut) return status;
  if (in_place) restore_mask(o, backup, n, stream);  // every other case starts from the mask
  if (settle_without_selection(status, m, o, n, n_keep, stream)) return status;
  if (mode == kModeTies) {
    tie_write<Bits>(s, m, o, n, ws + kCutKey, scores);
    return status;
  }
  // Bracket missed, too many candidates, or a crowded bin of distinct keys.
  return exact_select<Bits>(s, m, o, n, n_keep, scores);
}

// scores, mask, out: contiguous CUDA tensors on one device; out may be mask itself.
TopKStatus masked_topk_cuda_impl(const at::Tensor& scores, const at::Tensor& mask,
                                 const at::Tensor& out, int64_t n_keep) {
  if (scores.numel() == 0) return TopKStatus{};
  switch (scores.scalar_type()) {
    case at::kHalf:
      return run<HalfBits>(scores, mask, out, n_keep);
    case at::kBFloat16:
      return run<BFloat16Bits>(scores, mask, out, n_keep);
    case at::kFloat:
      return run<Float32Bits>(scores, mask, out, n_keep);
    case at::kDouble:
      return run<Float64Bits>(scores, mask, out, n_keep);
    default:
      TORCH_CHECK_TYPE(false, "masked_topk: unsupported scores dtype ", scores.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> masked_topk_cuda(const at::Tensor& scores, const at::Tensor& mask,
                                                    int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({m.size(0)}, m.options());
  const TopKStatus st = masked_topk_cuda_impl(s, m, out, n_keep);
  return {out, status_tensor(st)};
}

at::Tensor masked_topk_cuda_(const at::Tensor& scores, at::Tensor& mask, int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  if (mask.is_contiguous()) return status_tensor(masked_topk_cuda_impl(s, mask, mask, n_keep));
  at::Tensor m = mask.contiguous();
  const TopKStatus st = masked_topk_cuda_impl(s, m, m, n_keep);
  if (st.ok(n_keep)) mask.copy_(m);
  return status_tensor(st);
}

}  // namespace
}  // namespace cuda
}  // namespace ntksap_fast

TORCH_LIBRARY_IMPL(ntksap_fast, CUDA, m) {
  m.impl("masked_topk", &ntksap_fast::cuda::masked_topk_cuda);
  m.impl("masked_topk_", &ntksap_fast::cuda::masked_topk_cuda_);
}
