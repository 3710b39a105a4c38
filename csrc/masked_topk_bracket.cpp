// Masked global top-k, CPU: the sample-bracketed fast path MaskedTopK<Bits>::guess(), tried
// first for N >= 2^16 (kGuessMinN), two passes over the data:
//  0. Sample ~N/128 entries at fixed hashed positions (deterministic; the result never depends
//     on the sample) and bracket the threshold: keys [lo, hi] around the expected rank of the
//     n_keep-th largest unpruned key, 4 standard deviations either side.
//  1. Read-only pass: count unpruned entries (n_keep is validated against the count), flag NaNs
//     (raise before anything is written), count keys > hi and collect the unpruned keys in
//     [lo, hi] with their indices (blocks of 32 entries counted with SIMD compares first, only
//     blocks holding a candidate scanned again).
//  2. If the bracket holds the threshold (count above hi <= n_keep <= that + candidates), the
//     threshold key t is the k-th largest candidate (nth_element on the candidate keys, about
//     4/sqrt(samples) of N), and one write pass sets keep = key > t; the first candidates equal
//     to t, in index order, complete n_keep. (All candidates equal: ties resolved in the write
//     pass from per-chunk counts.)
// Otherwise (bracket missed, too many candidates, mostly pruned) guess() returns false having
// written nothing, and run() takes the exact radix path (masked_topk_radix.cpp).
#include "masked_topk_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

namespace ntksap_fast {
namespace detail {
namespace {

struct ScanResult {
  uint64_t count = 0, above = 0, inr = 0;  // unpruned; key > hi; lo <= key <= hi
  int64_t ncand = 0;                       // candidates stored (when no overflow)
  bool nan = false, overflow = false;
};

// Pass 1 of the bracketed path over [b, e): counts, NaN flag, and the candidates lo <= key <= hi
// (unpruned) stored in index order into kbuf/ibuf (key, index; capacity cap).
constexpr int64_t kScanBlock = 32;
template <typename Bits>
ScanResult scan_bracket(const typename Bits::key_t* __restrict s, const uint8_t* __restrict m,
                        int64_t b, int64_t e, typename Bits::key_t lo, typename Bits::key_t hi,
                        typename Bits::key_t* __restrict kbuf, int64_t* __restrict ibuf,
                        int64_t cap) {
  using Key = typename Bits::key_t;
  using Float = typename FloatOf<Bits>::type;
  constexpr bool kFloat = !std::is_same_v<Float, void*>;
  ScanResult r;
  uint32_t nan = 0;
  int64_t k = 0;
// float32/float64: compare as floats (cheaper than keys; equal for non-NaN values, -0.0 ==
  // 0.0 included); float16/bfloat16: compare keys.
  [[maybe_unused]] const Float* __restrict sf = reinterpret_cast<const Float*>(s);
  [[maybe_unused]] Float lo_f{}, hi_f{};
  if constexpr (kFloat) {
    const Key lo_b = Bits::from_key(lo), hi_b = Bits::from_key(hi);
    std::memcpy(&lo_f, &lo_b, sizeof(Float));
    std::memcpy(&hi_f, &hi_b, sizeof(Float));
  }
  int64_t i0 = b;
// Full blocks: vectorised counts and per-entry candidate flags; the (rare) candidates are
  // then stored by walking the set bits of the flags, in index order.
  for (; i0 + kScanBlock <= e; i0 += kScanBlock) {
    uint32_t bc = 0, ba = 0, bi = 0, bn = 0;
    uint8_t flag[kScanBlock];
    for (int64_t j = 0; j < kScanBlock; ++j) {
      const uint32_t mi = m[i0 + j];
      uint32_t above, in, isnan;
      if constexpr (kFloat) {
        const Float x = sf[i0 + j];
        above = static_cast<uint32_t>(x > hi_f);
        in = static_cast<uint32_t>(x >= lo_f) & static_cast<uint32_t>(x <= hi_f);
        isnan = static_cast<uint32_t>(x != x);
      } else {
        const Key bits = s[i0 + j];
        const Key key = Bits::to_key(bits);
        above = static_cast<uint32_t>(key > hi);
        in = static_cast<uint32_t>(key >= lo) & static_cast<uint32_t>(key <= hi);
        isnan = static_cast<uint32_t>(Bits::is_nan(bits));
      }
      bc += mi;
      ba += mi & above;
      bi += mi & in;
      bn |= mi & isnan;
      flag[j] = static_cast<uint8_t>(mi & in);
    }
    r.count += bc;
    r.above += ba;
    r.inr += bi;
    nan |= bn;
    if (bi != 0 && !r.overflow) {
      if (k + static_cast<int64_t>(bi) > cap) {
        r.overflow = true;
      } else {
        uint32_t set = 0;
        for (int j = 0; j < static_cast<int>(kScanBlock); ++j)
          set |= static_cast<uint32_t>(flag[j]) << j;
        while (set != 0) {
          const int j = __builtin_ctz(set);
          set &= set - 1;
          kbuf[k] = Bits::to_key(s[i0 + j]);
          ibuf[k] = i0 + j;
          ++k;
        }
      }
    }
  }
  // Tail (< kScanBlock entries), scalar.
  for (int64_t i = i0; i < e; ++i) {
    const Key bits = s[i];
    const Key key = Bits::to_key(bits);
    const uint32_t mi = m[i];
    const uint32_t in = mi & static_cast<uint32_t>(key >= lo) & static_cast<uint32_t>(key <= hi);
    r.count += mi;
    r.above += mi & static_cast<uint32_t>(key > hi);
    r.inr += in;
    nan |= mi & static_cast<uint32_t>(Bits::is_nan(bits));
    if (in && !r.overflow) {
      if (k + 1 > cap) {
        r.overflow = true;
      } else {
        kbuf[k] = key;
        ibuf[k] = i;
        ++k;
      }
    }
  }
  r.nan = nan != 0;
  r.ncand = k;
  return r;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Fast path: bracket the threshold from a sample, then one read-only pass that counts the
// unpruned entries, flags NaNs, counts keys above the bracket and collects the (few) keys
// inside it, and one write pass. Returns false (nothing written) when the bracket missed.
// ---------------------------------------------------------------------------------------
template <typename Bits>
bool MaskedTopK<Bits>::guess(int64_t n_keep) {
// Sample positions from a fixed hash: deterministic, and the result never depends on it.
// More samples narrow the bracket (fewer candidates: ~4 / sqrt(n_samples) of the entries)
  // but cost a cache miss each: n / 128 balances the two on a CPU.
  const double nd = static_cast<double>(n_);
  const int64_t n_samples = std::clamp<int64_t>(n_ / 128, int64_t(1) << 12, int64_t(1) << 17);
  std::vector<Key> sample(static_cast<size_t>(n_samples));
  std::vector<uint8_t> sampled(static_cast<size_t>(n_samples));
  at::parallel_for(0, n_samples, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const uint64_t h = splitmix64(static_cast<uint64_t>(j));
      const int64_t pos = static_cast<int64_t>(
          (static_cast<unsigned __int128>(h) * static_cast<uint64_t>(n_)) >> 64);
      sampled[static_cast<size_t>(j)] = m_[pos];
      sample[static_cast<size_t>(j)] = Bits::to_key(s_[pos]);
    }
  });
  int64_t ms = 0;
  for (int64_t j = 0; j < n_samples; ++j)
    if (sampled[static_cast<size_t>(j)]) sample[static_cast<size_t>(ms++)] = sample[static_cast<size_t>(j)];
  if (ms < 64) return false;  // mostly pruned: the estimate would be poor
  sample.resize(static_cast<size_t>(ms));

  // Expected number of sampled unpruned entries above the threshold, and a 4-sigma margin.
  const double p = std::min(1.0, static_cast<double>(n_keep) / nd);
  const double expect = p * static_cast<double>(n_samples);
  const double margin = 4.0 * std::sqrt(static_cast<double>(n_samples) * p * (1.0 - p)) + 8.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(expect - margin));  // 0 = largest
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(expect + margin));
  auto desc = [](Key a, Key b) { return a > b; };
  // Keys of +-inf bound all non-NaN keys (a NaN makes pass 1 throw whatever the bracket).
  Key hi = Bits::kKeyMax;  // "above" means key > hi: nothing when hi is the key of +inf
  Key lo = Bits::kKeyMin;
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
  // Candidates are lo <= key <= hi, "above" is key > hi.
  const Key hi_cmp = hi;

  // Pass 1 (read-only).
  const int64_t nc = ch_.count;
  std::vector<ScanResult> scan(static_cast<size_t>(nc));
  // Per-chunk candidate keys and indices. Virtual memory: only the pages written get touched.
  std::vector<std::unique_ptr<Key[]>> kbufs(static_cast<size_t>(nc));
  std::vector<std::unique_ptr<int64_t[]>> ibufs(static_cast<size_t>(nc));
  for (int64_t c = 0; c < nc; ++c) {
    kbufs[static_cast<size_t>(c)].reset(new Key[static_cast<size_t>(cap_ + kScanBlock)]);
    ibufs[static_cast<size_t>(c)].reset(new int64_t[static_cast<size_t>(cap_ + kScanBlock)]);
  }
  {
    const Key* const s = s_;
    const uint8_t* const m = m_;
    const Chunks ch = ch_;
    const int64_t cap = cap_;
    const Key lo_c = lo, hi_c = hi_cmp;
    std::vector<ScanResult>* const res = &scan;
    for_each_chunk(ch, [=, &kbufs, &ibufs](int64_t c) {
      (*res)[static_cast<size_t>(c)] = scan_bracket<Bits>(
          s, m, ch.begin(c), ch.end(c), lo_c, hi_c, kbufs[static_cast<size_t>(c)].get(),
          ibufs[static_cast<size_t>(c)].get(), cap);
    });
  }
  uint64_t count = 0, n_above = 0, n_inr = 0;
  bool over = false;
  for (const ScanResult& r : scan) {
    if (r.nan) throw_nan_error();
    count += r.count;
    n_above += r.above;
    n_inr += r.inr;
    over = over || r.overflow;
  }
  check_n_keep(n_keep, static_cast<int64_t>(count));
  if (n_keep == 0) {
    fill_zero();
    return true;
  }
  if (n_keep == static_cast<int64_t>(count)) {
    copy_mask();
    return true;
  }
  const uint64_t kk = static_cast<uint64_t>(n_keep);
  if (n_above > kk || n_above + n_inr < kk) return false;  // bracket missed
  const uint64_t k = kk - n_above;                         // to keep among the candidates
  if (lo == hi_cmp) {
    // All candidates share one key: ties by index, ranks from the per-chunk counts.
    std::vector<uint64_t> off(static_cast<size_t>(nc));
    uint64_t run = 0;
    for (int64_t c = 0; c < nc; ++c) {
      off[static_cast<size_t>(c)] = run;
      run += scan[static_cast<size_t>(c)].inr;
    }
    write_exact(lo, k, off);
    return true;
  }
  if (over) return false;  // too many candidates to collect
  if (k == 0) {  // nothing inside the bracket is kept
    write_above(hi_cmp, 0);
    return true;
  }
  // The threshold key t: the k-th largest candidate key (nth_element on a copy of the keys).
  int64_t total = 0;
  for (const ScanResult& r : scan) total += r.ncand;
  std::vector<Key> keys(static_cast<size_t>(total));
  {
    size_t at = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const size_t nci = static_cast<size_t>(scan[static_cast<size_t>(c)].ncand);
      std::memcpy(keys.data() + at, kbufs[static_cast<size_t>(c)].get(), sizeof(Key) * nci);
      at += nci;
    }
  }
  std::nth_element(keys.begin(), keys.begin() + static_cast<int64_t>(k - 1), keys.end(),
                   std::greater<Key>());
  const Key t = keys[static_cast<size_t>(k - 1)];
  uint64_t n_gt = 0;  // candidates above t: kept by the write pass
  for (const Key key : keys) n_gt += key > t;
  uint64_t ties = k - n_gt;  // >= 1 candidates equal to t to keep: the lowest indices
  // Pass 2: keep key > t, then the first `ties` candidates (index order) equal to t.
  write_above(t, 0);
  for (int64_t c = 0; c < nc && ties > 0; ++c) {
    const Key* kb = kbufs[static_cast<size_t>(c)].get();
    const int64_t* ib = ibufs[static_cast<size_t>(c)].get();
    const int64_t nci = scan[static_cast<size_t>(c)].ncand;
    for (int64_t j = 0; j < nci && ties > 0; ++j) {
      if (kb[j] == t) {
        out_[ib[j]] = 1;
        --ties;
      }
    }
  }
  return true;
}

template bool MaskedTopK<HalfBits>::guess(int64_t);
template bool MaskedTopK<BFloat16Bits>::guess(int64_t);
template bool MaskedTopK<Float32Bits>::guess(int64_t);
template bool MaskedTopK<Float64Bits>::guess(int64_t);

}  // namespace detail
}  // namespace ntksap_fast
