// Masked global top-k, CUDA: multi-block radix select over order-preserving integer keys.
//
// Same semantics as the CPU op (see ../masked_topk.h). Launch sequence, all on the current
// stream, state kept on the device in one small int64 tensor:
//  1. histogram kernel, digit 0 (8-bit digits, 256 bins): per-block shared-memory histogram of
//     the top digit of the unpruned keys, merged into the global histogram with atomics; the
//     same pass counts the unpruned entries and flags NaNs.
//  2. one small device-to-host read of (count, NaN flag): unavoidable, the op must raise on NaN
//     and on n_keep out of range before writing anything.
//  3. for each digit: select kernel (one block: scan of the 256 bins from the top, picks the bin
//     holding the k-th largest key, updates the prefix and k on the device, clears the
//     histogram), then the histogram kernel of the next digit among keys matching the prefix.
//     After the last digit the prefix is the exact threshold key T and k the number of entries
//     equal to T to keep (the lowest indices).
//  4. tie-count kernel: each block owns one contiguous segment and counts its entries == T.
//  5. write kernel: each block sums the tie counts of the blocks before it (its starting rank),
//     walks its segment in tiles with a warp-ballot / block prefix count of the ties, and writes
//     keep = unpruned && (key > T || (key == T && rank < k)).
// No sort and no copy of the scores; 64-bit indexing throughout.
#include "../key_traits.h"
#include "../masked_topk.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace ntksap_fast {
namespace {

constexpr int kRadixBits = 8;
constexpr int kRadix = 1 << kRadixBits;
constexpr int kThreads = 256;  // every kernel but select; a multiple of 32
constexpr int kWarps = kThreads / 32;

// Layout of the device state tensor (int64 words, used as unsigned long long).
constexpr int kCount = 0;   // unpruned entries
constexpr int kNan = 1;     // non-zero if a NaN was seen at an unpruned entry
constexpr int kK = 2;       // entries still to keep inside the current prefix
constexpr int kPrefix = 3;  // key digits chosen so far (the full threshold key at the end)
constexpr int kHist = 8;    // kRadix bins
constexpr int kStateWords = kHist + kRadix;

using ull = unsigned long long;

template <typename Bits>
__global__ void histogram_kernel(const typename Bits::key_t* __restrict__ s,
                                 const bool* __restrict__ m, int64_t n, ull* __restrict__ state,
                                 int level) {
  using Key = typename Bits::key_t;
  __shared__ unsigned int hist[kRadix];
  __shared__ unsigned int block_count;
  __shared__ unsigned int block_nan;
  for (int d = threadIdx.x; d < kRadix; d += blockDim.x) hist[d] = 0;
  if (threadIdx.x == 0) {
    block_count = 0;
    block_nan = 0;
  }
  __syncthreads();

  const int shift = Bits::kBits - kRadixBits * (level + 1);
  const int pshift = shift + kRadixBits;  // < kBits whenever level > 0
  const Key prefix = static_cast<Key>(state[kPrefix]);
  const int lane = threadIdx.x & 31;
  unsigned int count = 0, nan = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Uniform trip count per block (base, not i, bounds the loop) so that whole warps take part
  // in the warp-aggregated atomics below.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    bool hit = i < n && m[i];
    unsigned int bin = 0;
    if (hit) {
      const Key bits = s[i];
      const Key key = Bits::to_key(bits);
      if (level == 0) {
        ++count;
        nan |= static_cast<unsigned int>(Bits::is_nan(bits));
      } else {
        hit = static_cast<Key>(key >> pshift) == prefix;
      }
      bin = static_cast<unsigned int>(key >> shift) & (kRadix - 1);
    }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
    // Lanes with the same bin add once (scores often share their top digits: contention).
    const unsigned int peers = __match_any_sync(0xffffffffu, hit ? bin : kRadix);
    if (hit && lane == __ffs(peers) - 1)
      atomicAdd(&hist[bin], static_cast<unsigned int>(__popc(peers)));
#else
    (void)lane;
    if (hit) atomicAdd(&hist[bin], 1u);
#endif
  }
  if (level == 0) {
    if (count) atomicAdd(&block_count, count);
    if (nan) atomicOr(&block_nan, 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kRadix; d += blockDim.x)
    if (hist[d]) atomicAdd(&state[kHist + d], static_cast<ull>(hist[d]));
  if (level == 0 && threadIdx.x == 0) {
    if (block_count) atomicAdd(&state[kCount], static_cast<ull>(block_count));
    if (block_nan) atomicOr(&state[kNan], 1ull);
  }
}

// One block of kRadix threads: thread t looks at digit kRadix - 1 - t (largest first).
__global__ void select_kernel(ull* __restrict__ state) {
  __shared__ ull cum[kRadix];
  const int t = threadIdx.x;
  const int d = kRadix - 1 - t;
  const ull c = state[kHist + d];
  const ull k = state[kK];
  cum[t] = c;
  __syncthreads();
  for (int off = 1; off < kRadix; off <<= 1) {  // inclusive scan over t
    const ull v = t >= off ? cum[t - off] : 0ull;
    __syncthreads();
    cum[t] += v;
    __syncthreads();
  }
  const ull incl = cum[t];
  const ull excl = incl - c;
  // Every thread has read state[kK] and state[kPrefix] is only read below by the chosen one.
  if (excl < k && k <= incl) {  // exactly one thread: 1 <= k <= total
    state[kK] = k - excl;
    state[kPrefix] = (state[kPrefix] << kRadixBits) | static_cast<ull>(d);
  }
  state[kHist + d] = 0;  // ready for the next digit
}

__device__ __forceinline__ ull block_sum(ull v, ull* scratch /* kWarps */) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  ull total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Count unpruned entries equal to the threshold key in each block's contiguous segment.
template <typename Bits>
__global__ void tie_count_kernel(const typename Bits::key_t* __restrict__ s,
                                 const bool* __restrict__ m, int64_t n, int64_t seg,
                                 const ull* __restrict__ state, ull* __restrict__ block_ties) {
  using Key = typename Bits::key_t;
  __shared__ ull scratch[kWarps];
  const Key t = static_cast<Key>(state[kPrefix]);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * seg;
  const int64_t end = begin + seg < n ? begin + seg : n;
  ull local = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    local += (m[i] && Bits::to_key(s[i]) == t) ? 1ull : 0ull;
  const ull total = block_sum(local, scratch);
  if (threadIdx.x == 0) block_ties[blockIdx.x] = total;
}

// out may alias m (in-place op): each entry is read and written by the same thread only.
template <typename Bits>
__global__ void write_kernel(const typename Bits::key_t* __restrict__ s, const bool* m, bool* out,
                             int64_t n, int64_t seg, const ull* __restrict__ state,
                             const ull* __restrict__ block_ties) {
  using Key = typename Bits::key_t;
  __shared__ ull scratch[kWarps];
  __shared__ unsigned int warp_ties[kWarps];
  const Key t = static_cast<Key>(state[kPrefix]);
  const ull k = state[kK];
  // Starting tie rank of this block: ties in all earlier segments.
  ull part = 0;
  for (unsigned int j = threadIdx.x; j < blockIdx.x; j += blockDim.x) part += block_ties[j];
  ull running = block_sum(part, scratch);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * seg;
  const int64_t end = begin + seg < n ? begin + seg : n;
  for (int64_t base = begin; base < end; base += blockDim.x) {  // uniform trip count
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    const bool mi = valid && m[i];
    const Key key = mi ? Bits::to_key(s[i]) : Key(0);
    const bool eq = mi && key == t;
    const unsigned int ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    unsigned int before = __popc(ballot & ((1u << lane) - 1u)), tile = 0;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned int c = warp_ties[w];
      before += w < warp ? c : 0u;
      tile += c;
    }
    const ull rank = running + before;
    if (valid) out[i] = mi && (key > t || (eq && rank < k));
    running += tile;
    __syncthreads();  // warp_ties is rewritten by the next tile
  }
}

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

template <typename Bits>
void run(const at::Tensor& scores, const at::Tensor& mask, const at::Tensor& out, int64_t n_keep) {
  using Key = typename Bits::key_t;
  constexpr int kLevels = Bits::kBits / kRadixBits;
  const int64_t n = scores.numel();
  const Key* s = static_cast<const Key*>(scores.const_data_ptr());
  const bool* m = mask.const_data_ptr<bool>();
  bool* o = out.mutable_data_ptr<bool>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scores.get_device()).stream();
  const int sms = sm_count(scores.get_device());

  // Histogram grid: enough blocks to fill the GPU, and < 2^31 entries per block (uint32 bins).
  const int64_t want = (n + kThreads - 1) / kThreads;
  int64_t hblocks = std::min<int64_t>(want, static_cast<int64_t>(sms) * 8);
  hblocks = std::max<int64_t>(hblocks, (n + (int64_t(1) << 30) - 1) >> 30);
  hblocks = std::max<int64_t>(hblocks, 1);
  // Tie/write grid: contiguous segments, a multiple of kThreads long.
  int64_t wblocks = std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 8));
  int64_t seg = (n + wblocks - 1) / wblocks;
  seg = (seg + kThreads - 1) / kThreads * kThreads;
  wblocks = (n + seg - 1) / seg;

  at::Tensor state = at::zeros({kStateWords}, scores.options().dtype(at::kLong));
  ull* st = reinterpret_cast<ull*>(state.mutable_data_ptr<int64_t>());

  histogram_kernel<Bits><<<static_cast<unsigned int>(hblocks), kThreads, 0, stream>>>(s, m, n, st, 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one host round-trip: count and NaN flag, to raise before anything is written.
  const at::Tensor head = state.narrow(0, 0, 2).cpu();
  const int64_t* h = head.const_data_ptr<int64_t>();
  if (h[kNan] != 0) throw_nan_error();
  const int64_t count = h[kCount];
  check_n_keep(n_keep, count);
  if (n_keep == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(o, 0, static_cast<size_t>(n), stream));
    return;
  }
  if (n_keep == count) {
    if (o != m)
      C10_CUDA_CHECK(cudaMemcpyAsync(o, m, static_cast<size_t>(n), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  state.narrow(0, kK, 1).fill_(n_keep);

  for (int level = 0; level < kLevels; ++level) {
    if (level > 0) {
      histogram_kernel<Bits><<<static_cast<unsigned int>(hblocks), kThreads, 0, stream>>>(
          s, m, n, st, level);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    select_kernel<<<1, kRadix, 0, stream>>>(st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor ties = at::empty({wblocks}, scores.options().dtype(at::kLong));
  ull* tp = reinterpret_cast<ull*>(ties.mutable_data_ptr<int64_t>());
  tie_count_kernel<Bits><<<static_cast<unsigned int>(wblocks), kThreads, 0, stream>>>(s, m, n, seg,
                                                                                      st, tp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_kernel<Bits><<<static_cast<unsigned int>(wblocks), kThreads, 0, stream>>>(s, m, o, n, seg,
                                                                                  st, tp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// scores, mask, out: contiguous CUDA tensors on one device; out may be mask itself.
void masked_topk_cuda_impl(const at::Tensor& scores, const at::Tensor& mask, const at::Tensor& out,
                           int64_t n_keep) {
  if (scores.numel() == 0) {
    check_n_keep(n_keep, 0);
    return;
  }
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

at::Tensor masked_topk_cuda(const at::Tensor& scores, const at::Tensor& mask, int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({m.size(0)}, m.options());
  masked_topk_cuda_impl(s, m, out, n_keep);
  return out;
}

void masked_topk_cuda_(const at::Tensor& scores, at::Tensor& mask, int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  if (mask.is_contiguous()) {
    masked_topk_cuda_impl(s, mask, mask, n_keep);
  } else {
    at::Tensor m = mask.contiguous();
    masked_topk_cuda_impl(s, m, m, n_keep);
    mask.copy_(m);
  }
}

}  // namespace
}  // namespace ntksap_fast

TORCH_LIBRARY_IMPL(ntksap_fast, CUDA, m) {
  m.impl("masked_topk", &ntksap_fast::masked_topk_cuda);
  m.impl("masked_topk_", &ntksap_fast::masked_topk_cuda_);
}
