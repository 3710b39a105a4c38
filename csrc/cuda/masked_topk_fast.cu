// Masked global top-k, CUDA: the bracketed fast path (fast_select), one read of the scores, all
// kernels on the current stream, state in one zeroed workspace (layout in topk_cuda.cuh):
//  1. sample_kernel: 2^16 entries at jittered hashed positions (one per stratum of N / 2^16,
//     the same formula as the CPU op); a histogram of the top 16 key bits of the unpruned ones.
//  2. bracket_kernel (one block): keys [lo, hi] around the expected rank of the threshold among
//     the samples, 4 binomial standard deviations either side, widened to whole bins.
//  3. scan_kernel (the one read): counts unpruned entries, flags NaNs, counts keys > hi, writes
//     out = unpruned && key > hi (16-byte loads of the scores), saves the mask bits when in
//     place (so the host can put the mask back), and compacts the candidates lo <= key <= hi
//     (key, index) through a per-block shared-memory buffer: warp-aggregated reservations
//     (shuffle scan, one shared atomic per warp), one global atomic per flush of 512+.
//  4-6. The exact cut among the candidates and the fixup of out: select_candidates
//     (masked_topk_select.cu).
#include "topk_cuda.cuh"
#include "../splitmix64.h"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace ntksap_fast {
namespace cuda {
namespace {

constexpr int kLogSamples = 16;
constexpr int kSampleBins = 1 << 16;
constexpr int kBuf = 1024;   // per-block candidate buffer (entries)
constexpr int kFlush = 512;  // flushed to global memory from this fill on
constexpr int kTile = 4096;  // entries per block per iteration of scan_kernel
static_assert(kCandHist - kSampleHist == kSampleBins / 2, "workspace layout");

__device__ __forceinline__ int bit_length(ull x) { return x == 0 ? 0 : 64 - __clzll(x); }

template <typename Bits>
__global__ void __launch_bounds__(kThreads) sample_kernel(const typename Bits::key_t* __restrict__ s, const bool* __restrict__ m,
                              int64_t n, ull* __restrict__ ws) {
  using Key = typename Bits::key_t;
  const uint64_t j = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= (1ull << kLogSamples)) return;
  // floor((j + h / 2^64) * n / 2^16): j * n + (h * n >> 64) < 2^64 for n < 2^48.
  const uint64_t un = static_cast<uint64_t>(n);
  const int64_t pos = static_cast<int64_t>((j * un + __umul64hi(splitmix64(j), un)) >> kLogSamples);
  if (!m[pos]) return;
  const Key bits = s[pos];
  if (Bits::is_nan(bits)) return;
  const unsigned int bin = static_cast<unsigned int>(Bits::to_key(bits) >> (Bits::kBits - 16));
  atomicAdd(reinterpret_cast<unsigned int*>(ws + kSampleHist) + bin, 1u);
}

// One block of kSelThreads: thread t owns the 64 sample bins starting from the top at 64 t.
template <typename Bits>
__global__ void __launch_bounds__(kSelThreads) bracket_kernel(ull* __restrict__ ws, int64_t n, int64_t n_keep) {
  using Key = typename Bits::key_t;
  constexpr int kPer = kSampleBins / kSelThreads;
  constexpr int kShift = Bits::kBits - 16;
  __shared__ ull scan[kSelThreads];
  __shared__ long long bins[2];
  const unsigned int* h = reinterpret_cast<const unsigned int*>(ws + kSampleHist);
  const int t = threadIdx.x;
  const int top = kSampleBins - 1 - kPer * t;  // this thread's bins: top, top - 1, ...
  ull local = 0;
  for (int b = 0; b < kPer; ++b) local += h[top - b];
  scan[t] = local;
  if (t < 2) bins[t] = -1;
  __syncthreads();
  for (int off = 1; off < kSelThreads; off <<= 1) {  // inclusive scan over t
    const ull v = t >= off ? scan[t - off] : 0ull;
    __syncthreads();
    scan[t] += v;
    __syncthreads();
  }
  const ull ms = scan[kSelThreads - 1];
  const ull before = scan[t] - local;
  // Expected rank (0 = largest) of the threshold among the samples, 4-sigma margin.
  const double S = static_cast<double>(1ull << kLogSamples);
  const double p = fmin(1.0, static_cast<double>(n_keep) / static_cast<double>(n));
  const double expect = p * S;
  const double margin = 4.0 * sqrt(S * p * (1.0 - p)) + 8.0;
  const long long rank[2] = {static_cast<long long>(floor(expect - margin)),
                             static_cast<long long>(ceil(expect + margin))};
  for (int r = 0; r < 2; ++r) {
    if (rank[r] < 0 || static_cast<ull>(rank[r]) >= ms) continue;
    const ull want = static_cast<ull>(rank[r]);
    if (before <= want && want < before + local) {  // exactly one thread
      ull cum = before;
      for (int b = 0; b < kPer; ++b) {
        cum += h[top - b];
        if (cum > want) {
          bins[r] = top - b;
          break;
        }
      }
    }
  }
  __syncthreads();
  if (t == 0) {
    Key hi = Bits::kKeyMax, lo = Bits::kKeyMin;
    if (bins[0] >= 0) hi = static_cast<Key>(((static_cast<ull>(bins[0]) + 1) << kShift) - 1);
    if (bins[1] >= 0) lo = static_cast<Key>(static_cast<ull>(bins[1]) << kShift);
    lo = lo < Bits::kKeyMin ? Bits::kKeyMin : lo;
    hi = hi > Bits::kKeyMax ? Bits::kKeyMax : hi;
    hi = hi < lo ? lo : hi;
    ws[kLo] = lo;
    ws[kHi] = hi;
    const int cs = bit_length(static_cast<ull>(hi - lo)) - kCandBinBits;
    ws[kCShift] = static_cast<ull>(cs > 0 ? cs : 0);
  }
}

// Fixed-width loads and stores of V mask bytes.
template <int V>
struct alignas(V) Bytes {
  uint8_t b[V];
};

// One read of the scores and the mask. V entries per thread per step (16-byte loads of the
// scores when V > 1; V == 1 for misaligned views). Entries [0, n_vec) in whole warp steps
// (n_vec a multiple of 32 V, so each mask word of 32 entries belongs to one warp step), the
// rest by the first warp of block 0.
template <typename Bits, int V, bool kInPlace>
__global__ void __launch_bounds__(kThreads)
    scan_kernel(const typename Bits::key_t* __restrict__ s, const bool* m, bool* out,
                uint32_t* __restrict__ backup, int64_t n, ull* __restrict__ ws,
                typename Bits::key_t* __restrict__ ckey, int64_t* __restrict__ cidx, int64_t cap) {
  using Key = typename Bits::key_t;
  constexpr int kSteps = kTile / (kThreads * V);
  __shared__ Key buf_key[kBuf];
  __shared__ int64_t buf_idx[kBuf];
  __shared__ unsigned int buf_fill;
  __shared__ ull buf_base;
  __shared__ ull scratch[kWarps];
  const Key lo = static_cast<Key>(ws[kLo]), hi = static_cast<Key>(ws[kHi]);
  const int lane = threadIdx.x & 31;
  if (threadIdx.x == 0) buf_fill = 0;
  __syncthreads();
  ull count = 0, above = 0, inside = 0;
  unsigned int nan = 0;

  // Store this warp's candidates (c of them, bits cbits, for this lane) in the block buffer;
  // whatever does not fit goes straight to global memory (its own reservation there).
  auto push = [&](int c, const Key* keys, int64_t i0, unsigned int cbits) {
    int incl = c;
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += v;
    }
    const unsigned int total = static_cast<unsigned int>(__shfl_sync(0xffffffffu, incl, 31));
    if (total == 0) return;
    unsigned int slot = 0;
    ull gbase = 0;
    if (lane == 0) {
      slot = atomicAdd(&buf_fill, total);
      const unsigned int fits = slot >= kBuf ? 0u : min(total, kBuf - slot);
      if (fits < total) gbase = atomicAdd(&ws[kNCand], static_cast<ull>(total - fits));
    }
    slot = __shfl_sync(0xffffffffu, slot, 0);
    gbase = __shfl_sync(0xffffffffu, gbase, 0);
    const unsigned int first_global = max(slot, static_cast<unsigned int>(kBuf));
    unsigned int at = slot + static_cast<unsigned int>(incl - c);
    for (int e = 0; e < V; ++e) {
      if (!((cbits >> e) & 1u)) continue;
      if (at < static_cast<unsigned int>(kBuf)) {
        buf_key[at] = keys[e];
        buf_idx[at] = i0 + e;
      } else if (gbase + (at - first_global) < static_cast<ull>(cap)) {
        ckey[gbase + (at - first_global)] = keys[e];
        cidx[gbase + (at - first_global)] = i0 + e;
      }
      ++at;
    }
  };

  auto flush = [&](bool force) {
    __syncthreads();
    // Claimed slots past kBuf were stored in global memory by push.
    const unsigned int fill = min(buf_fill, static_cast<unsigned int>(kBuf));
    if (fill == 0 || (!force && fill < static_cast<unsigned int>(kFlush))) return;  // uniform
    if (threadIdx.x == 0) buf_base = atomicAdd(&ws[kNCand], static_cast<ull>(fill));
    __syncthreads();
    const ull base = buf_base;
    for (unsigned int j = threadIdx.x; j < fill; j += blockDim.x)
      if (base + j < static_cast<ull>(cap)) {
        ckey[base + j] = buf_key[j];
        cidx[base + j] = buf_idx[j];
      }
    __syncthreads();
    if (threadIdx.x == 0) buf_fill = 0;
    __syncthreads();
  };

  const int64_t n_vec = n - n % (32 * V);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTile;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kTile; base < n_vec; base += stride) {
    for (int step = 0; step < kSteps; ++step) {
      const int64_t i0 = base + (static_cast<int64_t>(step) * kThreads + threadIdx.x) * V;
      if (i0 - lane * V >= n_vec) continue;  // whole warp past the vector part
      Key keys[V];
      Bytes<V> mb, ob;
      if constexpr (V > 1) {
        const uint4 raw = *reinterpret_cast<const uint4*>(s + i0);
        memcpy(keys, &raw, sizeof(raw));
      } else {
        keys[0] = s[i0];
      }
      mb = *reinterpret_cast<const Bytes<V>*>(m + i0);
      unsigned int cbits = 0, mbits = 0;
      int c = 0;
      for (int e = 0; e < V; ++e) {
        const Key bits = keys[e];
        const unsigned int mi = mb.b[e] != 0;
        const Key key = Bits::to_key(bits);
        const unsigned int a = mi & static_cast<unsigned int>(key > hi);
        const unsigned int in = mi & static_cast<unsigned int>(key >= lo) & static_cast<unsigned int>(key <= hi);
        nan |= mi & static_cast<unsigned int>(Bits::is_nan(bits));
        count += mi;
        above += a;
        inside += in;
        ob.b[e] = static_cast<uint8_t>(a);
        mbits |= mi << e;
        cbits |= in << e;
        c += static_cast<int>(in);
        keys[e] = key;
      }
      *reinterpret_cast<Bytes<V>*>(out + i0) = ob;
      if constexpr (kInPlace) {
        // Mask bits of 32 consecutive entries: 32 / V lanes, or-reduced.
        unsigned int w = mbits << ((lane * V) & 31);
        for (int off = 1; off < 32 / V; off <<= 1) w |= __shfl_xor_sync(0xffffffffu, w, off);
        if ((lane & (32 / V - 1)) == 0) backup[i0 / 32] = w;
      }
      push(c, keys, i0, cbits);
    }
    flush(false);
  }
  // Tail: fewer than 32 V entries, one per lane of warp 0 of block 0.
  if (blockIdx.x == 0 && threadIdx.x < 32) {
    for (int64_t b = n_vec; b < n; b += 32) {
      const int64_t i = b + lane;
      const bool valid = i < n;
      const unsigned int mi = valid && m[i];
      const Key bits = valid ? s[i] : Key(0);
      const Key key = Bits::to_key(bits);
      const unsigned int a = mi & static_cast<unsigned int>(key > hi);
      const unsigned int in = mi & static_cast<unsigned int>(key >= lo) & static_cast<unsigned int>(key <= hi);
      nan |= mi & static_cast<unsigned int>(Bits::is_nan(bits));
      count += mi;
      above += a;
      inside += in;
      if (valid) out[i] = a;
      const unsigned int w = __ballot_sync(0xffffffffu, mi);
      if (kInPlace && lane == 0) backup[b / 32] = w;
      push(static_cast<int>(in), &key, i, in);
    }
  }
  flush(true);
  const ull bc = block_sum(count, scratch), ba = block_sum(above, scratch);
  const ull bi = block_sum(inside, scratch), bn = block_sum(nan, scratch);
  if (threadIdx.x == 0) {
    if (bc) atomicAdd(&ws[kCount], bc);
    if (ba) atomicAdd(&ws[kAbove], ba);
    if (bi) atomicAdd(&ws[kInside], bi);
    if (bn) atomicOr(&ws[kNan], 1ull);
  }
}

template <typename Bits, int V, bool kInPlace>
void launch_scan(const typename Bits::key_t* s, const bool* m, bool* o, uint32_t* backup, int64_t n,
                 ull* ws, typename Bits::key_t* ckey, int64_t* cidx, int64_t cap, int sms,
                 cudaStream_t stream) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kTile - 1) / kTile, int64_t(sms) * 4));
  scan_kernel<Bits, V, kInPlace><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      s, m, o, backup, n, ws, ckey, cidx, cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Bits>
void launch_scan_any(const typename Bits::key_t* s, const bool* m, bool* o, uint32_t* backup,
                     int64_t n, ull* ws, typename Bits::key_t* ckey, int64_t* cidx, int64_t cap,
                     int sms, cudaStream_t stream) {
  constexpr int kV = 16 / static_cast<int>(sizeof(typename Bits::key_t));
  const auto addr = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };
  const bool vec = addr(s) % 16 == 0 && addr(m) % kV == 0 && addr(o) % kV == 0;
  if (o == m) {
    if (vec)
      launch_scan<Bits, kV, true>(s, m, o, backup, n, ws, ckey, cidx, cap, sms, stream);
    else
      launch_scan<Bits, 1, true>(s, m, o, backup, n, ws, ckey, cidx, cap, sms, stream);
  } else {
    if (vec)
      launch_scan<Bits, kV, false>(s, m, o, backup, n, ws, ckey, cidx, cap, sms, stream);
    else
      launch_scan<Bits, 1, false>(s, m, o, backup, n, ws, ckey, cidx, cap, sms, stream);
  }
}

}  // namespace

template <typename Bits>
void fast_select(const typename Bits::key_t* s, const bool* m, bool* o, uint32_t* backup, int64_t n,
                 int64_t n_keep, ull* ws, typename Bits::key_t* ckey, int64_t* cidx, int64_t cap,
                 int sms, cudaStream_t stream) {
  sample_kernel<Bits><<<(1u << kLogSamples) / kThreads, kThreads, 0, stream>>>(s, m, n, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bracket_kernel<Bits><<<1, kSelThreads, 0, stream>>>(ws, n, n_keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_scan_any<Bits>(s, m, o, backup, n, ws, ckey, cidx, cap, sms, stream);
  select_candidates<Bits>(ws, ckey, cidx, o, n_keep, cap, sms, stream);
}

#define NTKSAP_INSTANTIATE(B)                                                                     \
  template void fast_select<B>(const B::key_t*, const bool*, bool*, uint32_t*, int64_t, int64_t, \
                               ull*, B::key_t*, int64_t*, int64_t, int, cudaStream_t);
NTKSAP_INSTANTIATE(HalfBits)
NTKSAP_INSTANTIATE(BFloat16Bits)
NTKSAP_INSTANTIATE(Float32Bits)
NTKSAP_INSTANTIATE(Float64Bits)
#undef NTKSAP_INSTANTIATE

}  // namespace cuda
}  // namespace ntksap_fast
