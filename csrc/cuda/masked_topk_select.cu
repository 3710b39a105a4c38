// Masked global top-k, CUDA: steps 4-6 of the fast path (masked_topk_fast.cu), the exact cut
// among the candidates that the scan compacted (keys in [lo, hi], about 1.5% of the entries):
//  4. cand_hist_kernel: shared-memory histogram of the candidate keys over [lo, hi] (4096 bins,
//     (key - lo) >> cshift); its last block (atomic ticket) picks the bin holding the threshold
//     and the rank k2 inside it.
//  5. gather_kernel + cut_kernel (one block): that bin's candidates (at most kGatherCap) sorted
//     by (key desc, index asc) in shared memory (bitonic); the k2-th is the exact last kept
//     (key, index). A bin with more candidates: kModeTies when it holds a single key (the host
//     then keeps its first k2 entries by index), else kModeExact.
//  6. fixup_kernel: out[idx] = 1 for every kept candidate.
// Every kernel first checks that the device can settle the call (no NaN, 0 < n_keep < count,
// the bracket holds the threshold, no candidate lost) and otherwise leaves the decision to the
// host (masked_topk_cuda.cu).
#include "topk_cuda.cuh"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace ntksap_fast {
namespace cuda {
namespace {

constexpr int kCandBins = 1 << kCandBinBits;
static_assert(kGather - kCandHist == kCandBins / 2, "workspace layout");

// Whether the device can settle the call: no NaN, 0 < n_keep < count, bracket holds the
// threshold, every candidate stored.
__device__ __forceinline__ bool settled(const ull* ws, int64_t n_keep, int64_t cap) {
  const ull k = static_cast<ull>(n_keep);
  return ws[kNan] == 0 && k > 0 && k < ws[kCount] && ws[kAbove] <= k && k <= ws[kAbove] + ws[kInside] &&
         ws[kNCand] <= static_cast<ull>(cap);
}

template <typename Bits>
__global__ void __launch_bounds__(kSelThreads) cand_hist_kernel(ull* __restrict__ ws, const typename Bits::key_t* __restrict__ ckey,
                                 int64_t n_keep, int64_t cap) {
  using Key = typename Bits::key_t;
  __shared__ unsigned int hist[kCandBins];
  __shared__ bool last;
  if (!settled(ws, n_keep, cap)) return;  // the same answer in every block
  const ull k = static_cast<ull>(n_keep) - ws[kAbove];
  if (k == 0) {  // no candidate kept: out is final
    if (blockIdx.x == 0 && threadIdx.x == 0) ws[kMode] = kModeDone;
    return;
  }
  const Key lo = static_cast<Key>(ws[kLo]);
  const int cs = static_cast<int>(ws[kCShift]);
  const int64_t nc = static_cast<int64_t>(ws[kNCand]);
  for (int b = threadIdx.x; b < kCandBins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nc;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    atomicAdd(&hist[static_cast<ull>(static_cast<Key>(ckey[j] - lo)) >> cs], 1u);
  __syncthreads();
  unsigned int* g = reinterpret_cast<unsigned int*>(ws + kCandHist);
  for (int b = threadIdx.x; b < kCandBins; b += blockDim.x)
    if (hist[b]) atomicAdd(g + b, hist[b]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&ws[kTicket], 1ull) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  // The last block: the bin holding the k-th largest candidate (bins from the top).
  __shared__ ull scan[kSelThreads];
  constexpr int kPer = kCandBins / kSelThreads;
  const int t = threadIdx.x;
  const int top = kCandBins - 1 - kPer * t;
  ull local = 0;
  for (int b = 0; b < kPer; ++b) local += __ldcg(g + top - b);
  scan[t] = local;
  __syncthreads();
  for (int off = 1; off < kSelThreads; off <<= 1) {
    const ull v = t >= off ? scan[t - off] : 0ull;
    __syncthreads();
    scan[t] += v;
    __syncthreads();
  }
  const ull before = scan[t] - local;
  if (before < k && k <= before + local) {  // exactly one thread (k <= candidates)
    ull cum = before;
    for (int b = 0; b < kPer; ++b) {
      const ull c = __ldcg(g + top - b);
      if (cum + c >= k) {
        const ull k2 = k - cum;
        ws[kBin] = static_cast<ull>(top - b);
        ws[kK2] = k2;
        if (c <= kGatherCap) {
          ws[kMode] = kModeGather;
        } else if (cs == 0) {  // the bin is one key: ties, kept by index
          ws[kCutKey] = static_cast<ull>(static_cast<Key>(lo + static_cast<Key>(top - b)));
          ws[kCutIdx] = k2;
          ws[kMode] = kModeTies;
        } else {
          ws[kMode] = kModeExact;
        }
        break;
      }
      cum += c;
    }
  }
}

template <typename Bits>
__global__ void __launch_bounds__(kSelThreads) gather_kernel(ull* __restrict__ ws, const typename Bits::key_t* __restrict__ ckey,
                              const int64_t* __restrict__ cidx) {
  using Key = typename Bits::key_t;
  if (ws[kMode] != kModeGather) return;
  const Key lo = static_cast<Key>(ws[kLo]);
  const int cs = static_cast<int>(ws[kCShift]);
  const ull bin = ws[kBin];
  const int64_t nc = static_cast<int64_t>(ws[kNCand]);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nc;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Key key = ckey[j];
    if ((static_cast<ull>(static_cast<Key>(key - lo)) >> cs) == bin) {
      const ull slot = atomicAdd(&ws[kNGather], 1ull);  // < kGatherCap: the bin's count
      ws[kGather + 2 * slot] = static_cast<ull>(key);
      ws[kGather + 2 * slot + 1] = static_cast<ull>(cidx[j]);
    }
  }
}

// One block of kSelThreads: bitonic sort of the gathered (key, index) pairs, best first.
__global__ void __launch_bounds__(kSelThreads) cut_kernel(ull* __restrict__ ws) {
  __shared__ ull key[kGatherCap];
  __shared__ ull idx[kGatherCap];
  if (ws[kMode] != kModeGather) return;
  const ull ng = ws[kNGather];
  for (int i = threadIdx.x; i < kGatherCap; i += blockDim.x) {
    const bool real = static_cast<ull>(i) < ng;
    key[i] = real ? ws[kGather + 2 * i] : 0ull;  // 0 is below every non-NaN key
    idx[i] = real ? ws[kGather + 2 * i + 1] : ~0ull;
  }
  __syncthreads();
  // before(a, b): a is kept first (larger key, then lower index).
  auto before = [&](int a, int b) { return key[a] > key[b] || (key[a] == key[b] && idx[a] < idx[b]); };
  for (int size = 2; size <= kGatherCap; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < kGatherCap; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool up = (i & size) == 0;  // this run best first, else worst first
          if (up ? before(j, i) : before(i, j)) {
            const ull tk = key[i], ti = idx[i];
            key[i] = key[j];
            idx[i] = idx[j];
            key[j] = tk;
            idx[j] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    const ull k2 = ws[kK2];  // 1 <= k2 <= ng
    ws[kCutKey] = key[k2 - 1];
    ws[kCutIdx] = idx[k2 - 1];
    ws[kMode] = kModeCut;
  }
}

template <typename Bits>
__global__ void __launch_bounds__(kSelThreads) fixup_kernel(const ull* __restrict__ ws, const typename Bits::key_t* __restrict__ ckey,
                             const int64_t* __restrict__ cidx, bool* out) {
  using Key = typename Bits::key_t;
  if (ws[kMode] != kModeCut) return;
  const Key ck = static_cast<Key>(ws[kCutKey]);
  const int64_t ci = static_cast<int64_t>(ws[kCutIdx]);
  const int64_t nc = static_cast<int64_t>(ws[kNCand]);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nc;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Key key = ckey[j];
    const int64_t i = cidx[j];
    if (key > ck || (key == ck && i <= ci)) out[i] = true;
  }
}

}  // namespace

template <typename Bits>
void select_candidates(ull* ws, const typename Bits::key_t* ckey, const int64_t* cidx, bool* o,
                       int64_t n_keep, int64_t cap, int sms, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(std::min(sms, 64));
  cand_hist_kernel<Bits><<<blocks, kSelThreads, 0, stream>>>(ws, ckey, n_keep, cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gather_kernel<Bits><<<blocks, kSelThreads, 0, stream>>>(ws, ckey, cidx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cut_kernel<<<1, kSelThreads, 0, stream>>>(ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  fixup_kernel<Bits><<<blocks, kSelThreads, 0, stream>>>(ws, ckey, cidx, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define NTKSAP_INSTANTIATE(B)                                                                   \
  template void select_candidates<B>(ull*, const B::key_t*, const int64_t*, bool*, int64_t,    \
                                     int64_t, int, cudaStream_t);
NTKSAP_INSTANTIATE(HalfBits)
NTKSAP_INSTANTIATE(BFloat16Bits)
NTKSAP_INSTANTIATE(Float32Bits)
NTKSAP_INSTANTIATE(Float64Bits)
#undef NTKSAP_INSTANTIATE

}  // namespace cuda
}  // namespace ntksap_fast
