// Masked global top-k, CPU: multi-threaded selection over order-preserving integer keys of the
// floats (key_traits.h), no sort of the vector and no copy of it (non-contiguous inputs are made
// contiguous first). All indexing is 64-bit. The vector is split into C contiguous chunks (C =
// threads, chunks < 2^31 entries); chunk c is the same range in every pass, so per-chunk counts
// from one pass are valid offsets for the next and the lower index wins every tie.
//
// N >= 2^16 takes the sample-bracketed one-pass path; small N and whatever that path cannot
// settle go to the exact radix select. Files:
//   masked_topk.cpp         input checks, dtype dispatch, the CPU entry points and the op
//                           schemas/registration (TORCH_LIBRARY ntksap_fast).
//   masked_topk_cpu.h       MaskedTopK<Bits> (internal, namespace detail) and the write passes
//                           both paths share.
//   masked_topk_bracket.cpp the sample-bracketed path (one pass plus a touch-up);
//   masked_topk_scan.cpp    its fused pass (vectorised, AVX2 where the CPU has it).
//   masked_topk_radix.cpp   the exact radix-select path (16-bit digits, exact for any data).
//   cpu_chunks.h            the static split into per-thread chunks.
#include "masked_topk.h"

#include "key_traits.h"
#include "masked_topk_cpu.h"

#include <ATen/core/enum_tag.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ntksap_fast {

void check_topk_inputs(const at::Tensor& scores, const at::Tensor& mask, int64_t n_keep) {
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                   "masked_topk: scores must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "masked_topk: mask must be a bool tensor, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 1, "masked_topk: scores must be 1-D, got shape ",
                    scores.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 1, "masked_topk: mask must be 1-D, got shape ", mask.sizes());
  TORCH_CHECK_VALUE(scores.size(0) == mask.size(0),
                    "masked_topk: scores and mask must have the same length, got ",
                    scores.size(0), " and ", mask.size(0));
  TORCH_CHECK_VALUE(scores.device() == mask.device(),
                    "masked_topk: scores and mask must be on the same device, got ",
                    scores.device(), " and ", mask.device());
  TORCH_CHECK_VALUE(n_keep >= 0,
                    "masked_topk: n_keep must be in [0, number of unpruned entries], got ", n_keep);
}

at::Tensor status_tensor(const TopKStatus& st) {
  at::Tensor t = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = t.mutable_data_ptr<int64_t>();
  p[0] = st.count;
  p[1] = st.nan ? 1 : 0;
  return t;
}

namespace {

// scores, mask, out: contiguous CPU tensors of length n; out may be mask itself.
TopKStatus masked_topk_cpu_impl(const at::Tensor& scores, const at::Tensor& mask,
                                const at::Tensor& out, int64_t n_keep) {
  const int64_t n = scores.numel();
  if (n == 0) return TopKStatus{};
  const void* s = scores.const_data_ptr();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  uint8_t* o = reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>());
  switch (scores.scalar_type()) {
    case at::kHalf:
      return detail::MaskedTopK<HalfBits>(static_cast<const uint16_t*>(s), m, o, n).run(n_keep);
    case at::kBFloat16:
      return detail::MaskedTopK<BFloat16Bits>(static_cast<const uint16_t*>(s), m, o, n).run(n_keep);
    case at::kFloat:
      return detail::MaskedTopK<Float32Bits>(static_cast<const uint32_t*>(s), m, o, n).run(n_keep);
    case at::kDouble:
      return detail::MaskedTopK<Float64Bits>(static_cast<const uint64_t*>(s), m, o, n).run(n_keep);
    default:
      TORCH_CHECK_TYPE(false, "masked_topk: unsupported scores dtype ", scores.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_topk_cpu(const at::Tensor& scores, const at::Tensor& mask,
                                                   int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({m.size(0)}, m.options());
  detail::advise_huge_pages(out.mutable_data_ptr(), static_cast<size_t>(out.numel()));
  const TopKStatus st = masked_topk_cpu_impl(s, m, out, n_keep);
  return {out, status_tensor(st)};
}

at::Tensor masked_topk_cpu_(const at::Tensor& scores, at::Tensor& mask, int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const at::Tensor s = scores.contiguous();
  if (mask.is_contiguous()) return status_tensor(masked_topk_cpu_impl(s, mask, mask, n_keep));
  at::Tensor m = mask.contiguous();
  const TopKStatus st = masked_topk_cpu_impl(s, m, m, n_keep);
  if (st.ok(n_keep)) mask.copy_(m);
  return status_tensor(st);
}

}  // namespace ntksap_fast

TORCH_LIBRARY(ntksap_fast, m) {
  // Fake (meta) implementations live in ntksap_fast/topk.py; torch imports it when needed.
  m.set_python_module("ntksap_fast.select.topk");
  // Both return the status [count, nan] (int64, CPU) instead of raising on the data; see
  // masked_topk.h. The in-place op returns only the status: functionalization (torch.compile)
  // does not support custom ops whose output aliases an input; the Python wrapper
  // ntksap_fast.select.topk.masked_topk_ returns the mask.
  m.def("masked_topk(Tensor scores, Tensor mask, int n_keep) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ntksap_fast, CPU, m) {
  m.impl("masked_topk", &ntksap_fast::masked_topk_cpu);
  m.impl("masked_topk_", &ntksap_fast::masked_topk_cpu_);
}
