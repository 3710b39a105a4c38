// Masked global top-k, CPU: the sample-bracketed path MaskedTopK<Bits>::bracketed(), tried
// first for N >= 2^16 (kGuessMinN). One pass over the data plus a touch-up of the few entries
// near the threshold:
//  0. Sample S = 2^12..2^16 entries by jittered (stratified) sampling at fixed hashed positions
//     (deterministic; the result never depends on the sample) and bracket the threshold: keys
//     [lo, hi] around the expected rank of the n_keep-th largest unpruned key, 4 binomial
//     standard deviations either side (stratified sampling has less variance than that).
//  1. Fused pass (masked_topk_scan.cpp), one per thread over its chunk: counts the unpruned entries, flags NaNs, counts keys > hi, writes
//     out = mask && key > hi, and stores the unpruned keys in [lo, hi] with their indices (the
//     candidates, ~1-2% of the entries, in index order). In place it first saves the mask bits
//     (N/8 bytes) so that it can be put back.
//  2. If the bracket holds the threshold (above <= n_keep <= above + candidates): from the
//     pass's histogram of the candidate keys (4096 bins over [lo, hi]) the bin holding the
//     threshold, and
//     nth_element with (key desc, index asc) among that bin's candidates gives the exact last
//     kept (key, index); the kept candidates are set in out.
// A NaN or n_keep > count: status only, the mask put back (in place) or out all False. Bracket
// missed, too many candidates, mostly pruned: the mask is put back and the exact radix path
// runs (masked_topk_radix.cpp). All of it in one parallel region with two barriers (after the
// sampling, after the pass): each synchronisation costs, most on a busy machine.
#include "masked_topk_scan.h"
#include "splitmix64.h"

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

namespace ntksap_fast {
namespace detail {
namespace {

constexpr int kCandBinBits = 12;
constexpr int64_t kSampleAhead = 32;  // samples prefetched ahead

int bit_length(uint64_t x) { return x == 0 ? 0 : 64 - __builtin_clzll(x); }

// What the threads do after the pass, decided by one of them.
enum class Next { kRadix, kDone, kFixup, kRestoreError, kRestoreAll, kRestoreRadix };

// The bracket [lo, hi] from the samples (sampled[j]: sample j is unpruned) and the room for the
// candidates per chunk. False when too few samples are unpruned for an estimate.
template <typename Bits>
bool make_bracket(int64_t n, int64_t n_keep, int64_t n_samples, std::vector<typename Bits::key_t>& sample,
                  const std::vector<uint8_t>& sampled, typename Bits::key_t& lo,
                  typename Bits::key_t& hi, int64_t& cap) {
  using Key = typename Bits::key_t;
  int64_t ms = 0;
  for (int64_t j = 0; j < n_samples; ++j)
    if (sampled[static_cast<size_t>(j)]) sample[static_cast<size_t>(ms++)] = sample[static_cast<size_t>(j)];
  if (ms < 64) return false;  // mostly pruned: the estimate would be poor
  sample.resize(static_cast<size_t>(ms));
  // Expected rank (0 = largest) of the threshold among the samples, and a 4-sigma margin.
  const double p = std::min(1.0, static_cast<double>(n_keep) / static_cast<double>(n));
  const double expect = p * static_cast<double>(n_samples);
  const double margin = 4.0 * std::sqrt(static_cast<double>(n_samples) * p * (1.0 - p)) + 8.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(expect - margin));
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(expect + margin));
  auto desc = [](Key x, Key y) { return x > y; };
  // Keys of +-inf bound all non-NaN keys (a NaN ends the call after the pass whatever the
  // bracket). "Above" is key > hi: nothing when hi is the key of +inf.
  hi = Bits::kKeyMax;
  lo = Bits::kKeyMin;
  if (lo_rank < ms) {
    std::nth_element(sample.begin(), sample.begin() + lo_rank, sample.end(), desc);
    lo = sample[static_cast<size_t>(lo_rank)];
  }
  if (hi_rank >= 0 && hi_rank < ms) {
    std::nth_element(sample.begin(), sample.begin() + hi_rank,
                     sample.begin() + std::min<int64_t>(lo_rank, ms), desc);
    hi = sample[static_cast<size_t>(hi_rank)];
  }
  lo = std::clamp(lo, Bits::kKeyMin, Bits::kKeyMax);
  hi = std::clamp(hi, lo, Bits::kKeyMax);
  // Room for the candidates: twice the sample's estimate, per chunk (only pages written are
  // touched); more means a bad bracket, settled by the radix path.
  const int64_t in_sample = static_cast<int64_t>(
      std::count_if(sample.begin(), sample.end(), [&](Key x) { return x >= lo && x <= hi; }));
  cap = std::min<int64_t>(n, 2 * (in_sample + 64) * (n / n_samples + 1) + 4096);
  return true;
}

// After the pass: the status, and either the exact cut (the last kept candidate in the order
// key desc, index asc) or what else to do.
template <typename Key>
Next decide(int64_t n_keep, const std::vector<ChunkScan>& scan, const std::vector<uint32_t>& hist,
            int64_t nbins, Key lo, int cshift, const std::vector<std::unique_ptr<Key[]>>& kbufs,
            const std::vector<std::unique_ptr<int64_t[]>>& ibufs, TopKStatus& st,
            Candidate<Key>& cut) {
  const int64_t nc = static_cast<int64_t>(scan.size());
  uint64_t n_above = 0, n_inr = 0;
  bool over = false;
  st = TopKStatus{};
  for (const ChunkScan& r : scan) {
    st.count += static_cast<int64_t>(r.count);
    st.nan = st.nan || r.nan;
    n_above += r.above;
    n_inr += r.inr;
    over = over || r.overflow;
  }
  if (!st.ok(n_keep)) return Next::kRestoreError;
  if (n_keep == st.count) return Next::kRestoreAll;
  const uint64_t kk = static_cast<uint64_t>(n_keep);
  if (over || n_above > kk || kk > n_above + n_inr) return Next::kRestoreRadix;  // missed
  const uint64_t k = kk - n_above;  // to keep among the candidates
  if (k == 0) return Next::kDone;   // none of them: out is final
  uint64_t above_bin = 0;
  int64_t bc = nbins - 1;
  for (;; --bc) {
    uint64_t in_bin = 0;
    for (int64_t c = 0; c < nc; ++c) in_bin += hist[static_cast<size_t>(c * nbins + bc)];
    if (above_bin + in_bin >= k || bc == 0) break;
    above_bin += in_bin;
  }
  std::vector<Candidate<Key>> g;
  for (int64_t c = 0; c < nc; ++c) {
    const Key* kb = kbufs[static_cast<size_t>(c)].get();
    const int64_t* ib = ibufs[static_cast<size_t>(c)].get();
    for (int64_t j = 0; j < scan[static_cast<size_t>(c)].ncand; ++j)
      if ((static_cast<uint64_t>(static_cast<Key>(kb[j] - lo)) >> cshift) == static_cast<uint64_t>(bc))
        g.push_back(Candidate<Key>{kb[j], ib[j]});
  }
  const uint64_t k2 = k - above_bin;  // 1 <= k2 <= g.size()
  std::nth_element(g.begin(), g.begin() + static_cast<int64_t>(k2 - 1), g.end(), better<Key>);
  cut = g[static_cast<size_t>(k2 - 1)];
  return Next::kFixup;
}

}  // namespace

template <typename Bits>
bool MaskedTopK<Bits>::bracketed(int64_t n_keep, TopKStatus& st) {
  // Sample j sits at a hashed position inside the j-th of S equal strata: floor((j + u_j) N / S)
  // with u_j = splitmix64(j) / 2^64. Each sample costs a cache miss: S = N / 256 (a power of two
  // in [2^12, 2^16]) balances their cost against the candidates' (~8 / sqrt(S) of N).
  const int log_s = std::clamp(bit_length(static_cast<uint64_t>(n_ / 256)) - 1, 12, 16);
  const int64_t n_samples = int64_t(1) << log_s;
  const int64_t nc = ch_.count;
  const bool in_place = out_ == m_;
  std::vector<Key> sample(static_cast<size_t>(n_samples));
  std::vector<uint8_t> sampled(static_cast<size_t>(n_samples));
  std::unique_ptr<uint32_t[]> backup;
  std::vector<std::unique_ptr<Key[]>> kbufs(static_cast<size_t>(nc));
  std::vector<std::unique_ptr<int64_t[]>> ibufs(static_cast<size_t>(nc));
  std::vector<ChunkScan> scan(static_cast<size_t>(nc));
  std::vector<uint32_t> hist;
  Key lo = Bits::kKeyMin, hi = Bits::kKeyMax;
  int cshift = 0;
  int64_t nbins = 1, cap = 0;
  Cand cut{};
  Next next = Next::kRadix;

  // One parallel region, two barriers: the threads sample, one of them brackets; each scans its
  // chunks; one of them decides (and finds the cut); each fixes up (or puts back) its chunks.
  const int threads = nc > 1 ? static_cast<int>(std::min<int64_t>(nc, at::get_num_threads())) : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
    // --- 0. Sample and bracket ---------------------------------------------------------------
    // Each sample is two cache misses (score and mask byte): they are prefetched kSampleAhead
    // samples ahead so that many are in flight at once.
    {
      const uint64_t n = static_cast<uint64_t>(n_);
      const Key* const s = s_;
      const uint8_t* const m = m_;
      Key* const sample_out = sample.data();
      uint8_t* const sampled_out = sampled.data();
      auto position = [n, log_s](int64_t j) {
        const uint64_t h = splitmix64(static_cast<uint64_t>(j));
        const unsigned __int128 num =
            static_cast<unsigned __int128>(j) * n + ((static_cast<unsigned __int128>(h) * n) >> 64);
        return static_cast<int64_t>(num >> log_s);
      };
      const int64_t j_begin = n_samples * t / nt, j_end = n_samples * (t + 1) / nt;
      for (int64_t j = j_begin; j < std::min(j_end, j_begin + kSampleAhead); ++j) {
        const int64_t pos = position(j);
        __builtin_prefetch(s + pos);
        __builtin_prefetch(m + pos);
      }
      for (int64_t j = j_begin; j < j_end; ++j) {
        if (j + kSampleAhead < j_end) {
          const int64_t ahead = position(j + kSampleAhead);
          __builtin_prefetch(s + ahead);
          __builtin_prefetch(m + ahead);
        }
        const int64_t pos = position(j);
        sampled_out[j] = m[pos];
        sample_out[j] = Bits::to_key(s[pos]);
      }
    }
#pragma omp barrier
#pragma omp single
    {
      try {
        if (make_bracket<Bits>(n_, n_keep, n_samples, sample, sampled, lo, hi, cap)) {
          const uint64_t span = static_cast<uint64_t>(hi - lo);
          cshift = std::max(0, bit_length(span) - kCandBinBits);
          nbins = static_cast<int64_t>(span >> cshift) + 1;
          hist.assign(static_cast<size_t>(nc * nbins), 0);
          if (in_place) {
            const size_t words = static_cast<size_t>(n_ / kBlock + 1);
            backup.reset(new uint32_t[words]);
            advise_huge_pages(backup.get(), words * sizeof(uint32_t));
          }
          for (int64_t c = 0; c < nc; ++c) {
            kbufs[static_cast<size_t>(c)].reset(new Key[static_cast<size_t>(cap)]);
            ibufs[static_cast<size_t>(c)].reset(new int64_t[static_cast<size_t>(cap)]);
          }
          next = Next::kDone;
        }
      } catch (...) {  // out of memory: the radix path
        next = Next::kRadix;
      }
    }  // (implicit barrier)
    if (next != Next::kRadix) {
      // --- 1. Fused pass -----------------------------------------------------------------------
      for (int64_t c = t; c < nc; c += nt) {
        const PassArgs<Key> args{s_, m_, out_, backup.get(), ch_.begin(c), ch_.end(c), lo, hi,
                                 kbufs[static_cast<size_t>(c)].get(),
                                 ibufs[static_cast<size_t>(c)].get(), cap,
                                 hist.data() + c * nbins, cshift};
        scan[static_cast<size_t>(c)] = fused_pass<Bits>(args, in_place);
      }
#pragma omp barrier
#pragma omp single
      {
        try {
          next = decide<Key>(n_keep, scan, hist, nbins, lo, cshift, kbufs, ibufs, st, cut);
        } catch (...) {
          next = Next::kRestoreRadix;
        }
      }  // (implicit barrier)
      // --- 3. Fixup (or put the mask back) -----------------------------------------------------
      for (int64_t c = t; c < nc; c += nt) {
        if (next == Next::kFixup) {
          // Locals only: a store through uint8_t* may alias anything, so members and the
          // vectors' contents would be reloaded after every store.
          const Key* const kb = kbufs[static_cast<size_t>(c)].get();
          const int64_t* const ib = ibufs[static_cast<size_t>(c)].get();
          const int64_t ncand = scan[static_cast<size_t>(c)].ncand;
          const Key cut_key = cut.key;
          const int64_t cut_idx = cut.idx;
          uint8_t* const out = out_;
          for (int64_t j = 0; j < ncand; ++j)
            if (kb[j] > cut_key || (kb[j] == cut_key && ib[j] <= cut_idx)) out[ib[j]] = 1;
        } else if (next != Next::kDone && in_place) {
          const uint32_t* bk = backup.get();
          for (int64_t i = ch_.begin(c); i < ch_.end(c); ++i)
            out_[i] = static_cast<uint8_t>((bk[i / kBlock] >> (i % kBlock)) & 1u);
        }
      }
    }
  }
  switch (next) {
    case Next::kDone:
    case Next::kFixup:
      return true;
    case Next::kRestoreError:
      if (!in_place) fill_zero();
      return true;
    case Next::kRestoreAll:
      copy_mask();
      return true;
    default:
      return false;
  }
}

template bool MaskedTopK<HalfBits>::bracketed(int64_t, TopKStatus&);
template bool MaskedTopK<BFloat16Bits>::bracketed(int64_t, TopKStatus&);
template bool MaskedTopK<Float32Bits>::bracketed(int64_t, TopKStatus&);
template bool MaskedTopK<Float64Bits>::bracketed(int64_t, TopKStatus&);

}  // namespace detail
}  // namespace ntksap_fast
