// Masked global top-k, CPU: multi-threaded selection over order-preserving integer keys of the
// floats (key_traits.h), no sort of the vector and no copy of it (non-contiguous inputs are made
// contiguous first). All indexing is 64-bit. The vector is split into C contiguous chunks (C =
// threads, chunks < 2^31 entries); chunk c is the same range in every pass, so per-chunk counts
// from one pass are valid offsets for the next and the lower index wins every tie.
//
// Fast path (N >= 2^16), two passes over the data:
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
// Otherwise (bracket missed, too many candidates, mostly pruned, small N) the exact radix path:
//  1. Histogram pass over the top 16-bit digit of the unpruned keys (one 2^16-bin histogram per
//     chunk), NaN flags and count.
//  2. Select the digit d holding the n_keep-th largest key (scan the summed histogram from the
//     top) and the number k still to keep inside that bin. Prefix P = digits chosen so far.
//  3. Then, whichever applies first: last digit: P is the exact threshold key T, one write pass
//     keeps key > T and the first k entries equal to T (starting ranks per chunk from the
//     per-chunk histograms); k == bin count: keep top bits >= P; bin small (<= max(2^20, N/32)
//     entries): one pass decides the entries outside the bin and collects those inside, then
//     nth_element with (key desc, index asc) picks k of them; else the next digit's histogram
//     among entries whose top bits == P.
#include "masked_topk.h"

#include "key_traits.h"

#include <ATen/Parallel.h>
#include <ATen/core/enum_tag.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

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

void check_n_keep(int64_t n_keep, int64_t count) {
  TORCH_CHECK_VALUE(n_keep >= 0 && n_keep <= count,
                    "masked_topk: n_keep must be in [0, number of unpruned entries = ", count,
                    "], got ", n_keep);
}

void throw_nan_error() {
  TORCH_CHECK_VALUE(false, "masked_topk: scores contains NaN at an unpruned entry (mask == True)");
  std::abort();  // unreachable
}

namespace {

constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t(1) << kDigitBits;
constexpr int64_t kSmallN = int64_t(1) << 17;       // below this: one chunk (threads cost more)
constexpr int64_t kMaxChunk = int64_t(1) << 31;     // uint32 bin counters cannot overflow
constexpr int64_t kGuessMinN = int64_t(1) << 16;    // sample-bracketed fast path from here on

// Static split of [0, n) into contiguous chunks; chunk c is always the same range in every pass,
// so per-chunk counts from one pass are valid offsets for the next.
struct Chunks {
  int64_t n = 0, count = 1, size = 0;
  explicit Chunks(int64_t n_) : n(n_) {
    int64_t threads = n < kSmallN ? 1 : std::max<int64_t>(1, at::get_num_threads());
    count = std::max<int64_t>(threads, (n + kMaxChunk - 1) / kMaxChunk);
    count = std::max<int64_t>(1, std::min<int64_t>(count, std::max<int64_t>(n, 1)));
    size = (n + count - 1) / count;
  }
  int64_t begin(int64_t c) const { return std::min(n, c * size); }
  int64_t end(int64_t c) const { return std::min(n, (c + 1) * size); }
};

template <typename F>
void for_each_chunk(const Chunks& ch, const F& f) {
  if (ch.count == 1) {
    f(int64_t(0));
    return;
  }
  at::parallel_for(0, ch.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(c);
  });
}

// Hot write loops as free functions with restrict pointers, so that GCC vectorises them.
template <typename Bits>
void above_inplace(const typename Bits::key_t* __restrict s, uint8_t* __restrict mo, int64_t b,
                   int64_t e, typename Bits::key_t t, int shift) {
  using Key = typename Bits::key_t;
  for (int64_t i = b; i < e; ++i) {
    const Key top = static_cast<Key>(Bits::to_key(s[i]) >> shift);
    mo[i] = static_cast<uint8_t>(mo[i] & static_cast<uint8_t>(top > t));
  }
}

template <typename Bits>
void above_out(const typename Bits::key_t* __restrict s, const uint8_t* __restrict m,
               uint8_t* __restrict o, int64_t b, int64_t e, typename Bits::key_t t, int shift) {
  using Key = typename Bits::key_t;
  for (int64_t i = b; i < e; ++i) {
    const Key top = static_cast<Key>(Bits::to_key(s[i]) >> shift);
    o[i] = static_cast<uint8_t>(m[i] & static_cast<uint8_t>(top > t));
  }
}

// Same as above with shift == 0, comparing as floats (float32/float64: cheaper than keys and
// equal to them for non-NaN values; t is the value of a non-NaN key).
template <typename Float>
void above_inplace_f(const Float* __restrict s, uint8_t* __restrict mo, int64_t b, int64_t e,
                     Float t) {
  for (int64_t i = b; i < e; ++i) mo[i] = static_cast<uint8_t>(mo[i] & static_cast<uint8_t>(s[i] > t));
}

template <typename Float>
void above_out_f(const Float* __restrict s, const uint8_t* __restrict m, uint8_t* __restrict o,
                 int64_t b, int64_t e, Float t) {
  for (int64_t i = b; i < e; ++i) o[i] = static_cast<uint8_t>(m[i] & static_cast<uint8_t>(s[i] > t));
}

template <typename Key>
struct Candidate {
  Key key;
  int64_t idx;
};

// Native floating type of a key type, for comparisons in the float domain (void* if none).
template <typename Bits>
struct FloatOf {
  using type = void*;
};
template <>
struct FloatOf<Float32Bits> {
  using type = float;
};
template <>
struct FloatOf<Float64Bits> {
  using type = double;
};

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

template <typename Bits>
class MaskedTopK {
  using Key = typename Bits::key_t;
  static constexpr int kKeyBits = Bits::kBits;
  static constexpr int kLevels = kKeyBits / kDigitBits;

  using Cand = Candidate<Key>;
  static bool better(const Cand& a, const Cand& b) {
    return a.key > b.key || (a.key == b.key && a.idx < b.idx);
  }

 public:
  MaskedTopK(const Key* s, const uint8_t* m, uint8_t* out, int64_t n)
      : s_(s), m_(m), out_(out), n_(n), ch_(n), cap_(std::clamp<int64_t>(n / 32, int64_t(1) << 20, int64_t(1) << 24)) {}

  void run(int64_t n_keep) {
    if (n_ >= kGuessMinN && guess(n_keep)) return;
    radix(n_keep);
  }

 private:
  // ---------------------------------------------------------------------------------------
  // Fast path: bracket the threshold from a sample, then one read-only pass that counts the
  // unpruned entries, flags NaNs, counts keys above the bracket and collects the (few) keys
  // inside it, and one write pass. Returns false (nothing written) when the bracket missed.
  // ---------------------------------------------------------------------------------------
  bool guess(int64_t n_keep) {
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

  // ---------------------------------------------------------------------------------------
  // General path: radix select with 16-bit digits (exact for any data, e.g. heavy ties).
  // ---------------------------------------------------------------------------------------
  void radix(int64_t n_keep) {
    hist_.reset(new uint32_t[static_cast<size_t>(ch_.count * kBins)]);
    total_.assign(static_cast<size_t>(kBins), 0);
    // Level 0: histogram of the top digit, NaN flags, count of unpruned entries.
    std::vector<uint8_t> nan_flags(static_cast<size_t>(ch_.count), 0);
    histogram(0, Key(0), nan_flags.data());
    for (uint8_t f : nan_flags)
      if (f) throw_nan_error();
    const int64_t count = reduce();
    check_n_keep(n_keep, count);
    if (n_keep == 0) return fill_zero();
    if (n_keep == count) return copy_mask();

    uint64_t k = static_cast<uint64_t>(n_keep);
    uint64_t prefix = 0;
    for (int level = 0;; ++level) {
      if (level > 0) {
        histogram(level, static_cast<Key>(prefix), nullptr);
        reduce();
      }
      // Scan bins from the top for the one holding the k-th largest key.
      uint64_t above = 0;
      int64_t d = kBins - 1;
      for (; d > 0; --d) {
        if (above + total_[static_cast<size_t>(d)] >= k) break;
        above += total_[static_cast<size_t>(d)];
      }
      k -= above;
      const uint64_t in_bin = total_[static_cast<size_t>(d)];
      prefix = (prefix << kDigitBits) | static_cast<uint64_t>(d);
      const int shift = kKeyBits - kDigitBits * (level + 1);
      if (level == kLevels - 1) return write_exact(static_cast<Key>(prefix), k, chunk_offsets(d));
      if (k == in_bin) {  // keep every entry with top bits >= prefix
        if (prefix == 0) return copy_mask();
        return write_above(static_cast<Key>(prefix - 1), shift);
      }
      if (static_cast<int64_t>(in_bin) <= cap_)
        return collect(static_cast<Key>(prefix), shift, d, k);
    }
  }

  uint32_t* chunk_hist(int64_t c) const { return hist_.get() + c * kBins; }

  // Histogram of digit `level` over unpruned entries whose key has top bits == prefix.
  void histogram(int level, Key prefix, uint8_t* nan_flags) {
    const int shift = kKeyBits - kDigitBits * (level + 1);
    for_each_chunk(ch_, [&](int64_t c) {
      uint32_t* h = chunk_hist(c);
      std::memset(h, 0, sizeof(uint32_t) * kBins);
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      const Key* s = s_;
      const uint8_t* m = m_;
      if (level == 0) {
        uint32_t nan = 0;
        for (int64_t i = b; i < e; ++i) {
          const Key bits = s[i];
          const uint32_t mi = m[i];
          h[static_cast<uint32_t>(Bits::to_key(bits) >> shift)] += mi;
          nan |= mi & static_cast<uint32_t>(Bits::is_nan(bits));
        }
        nan_flags[c] = static_cast<uint8_t>(nan != 0);
      } else {
        const int pshift = shift + kDigitBits;
        for (int64_t i = b; i < e; ++i) {
          const Key key = Bits::to_key(s[i]);
          const uint32_t hit =
              m[i] & static_cast<uint32_t>(static_cast<Key>(key >> pshift) == prefix);
          h[static_cast<uint32_t>(key >> shift) & static_cast<uint32_t>(kBins - 1)] += hit;
        }
      }
    });
  }

  // Sum the per-chunk histograms into total_; returns the grand total.
  int64_t reduce() {
    uint64_t sum = 0;
    for (int64_t d = 0; d < kBins; ++d) {
      uint64_t t = 0;
      for (int64_t c = 0; c < ch_.count; ++c) t += chunk_hist(c)[d];
      total_[static_cast<size_t>(d)] = t;
      sum += t;
    }
    return static_cast<int64_t>(sum);
  }

  // Exclusive prefix over chunks of each chunk's count in bin d of the last histogram.
  std::vector<uint64_t> chunk_offsets(int64_t d) const {
    std::vector<uint64_t> off(static_cast<size_t>(ch_.count));
    uint64_t run = 0;
    for (int64_t c = 0; c < ch_.count; ++c) {
      off[static_cast<size_t>(c)] = run;
      run += chunk_hist(c)[d];
    }
    return off;
  }

  void fill_zero() {
    for_each_chunk(ch_, [&](int64_t c) {
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      if (e > b) std::memset(out_ + b, 0, static_cast<size_t>(e - b));
    });
  }

  void copy_mask() {
    if (out_ == m_) return;
    for_each_chunk(ch_, [&](int64_t c) {
      const int64_t b = ch_.begin(c), e = ch_.end(c);
      if (e > b) std::memcpy(out_ + b, m_ + b, static_cast<size_t>(e - b));
    });
  }

  // out[i] = mask[i] && (key[i] >> shift) > t (shift = 0: key > t; t = prefix - 1 and shift
  // > 0: top bits >= prefix). Everything the loops read is in locals: stores through uint8_t*
  // may alias anything, so members would be reloaded and the loops would not vectorise.
  // Separate loops in place (one pointer) and out of place (restrict pointers).
  void write_above(Key t, int shift) {
    const Key* const s = s_;
    const uint8_t* const m = m_;
    uint8_t* const out = out_;
    const Chunks ch = ch_;
    using Float = typename FloatOf<Bits>::type;
    if constexpr (!std::is_same_v<Float, void*>) {
      if (shift == 0 && t >= Bits::kKeyMin && t <= Bits::kKeyMax) {
        const Key tb = Bits::from_key(t);
        Float tf;
        std::memcpy(&tf, &tb, sizeof(Float));
        const Float* sf = reinterpret_cast<const Float*>(s);
        for_each_chunk(ch, [=](int64_t c) {
          if (out == m)
            above_inplace_f<Float>(sf, out, ch.begin(c), ch.end(c), tf);
          else
            above_out_f<Float>(sf, m, out, ch.begin(c), ch.end(c), tf);
        });
        return;
      }
    }
    for_each_chunk(ch, [=](int64_t c) {
      if (out == m)
        above_inplace<Bits>(s, out, ch.begin(c), ch.end(c), t, shift);
      else
        above_out<Bits>(s, m, out, ch.begin(c), ch.end(c), t, shift);
    });
  }

  // Threshold key t is exact: keep key > t and the first k entries (by index) with key == t;
  // off[c] is the number of unpruned entries with key == t before chunk c.
  void write_exact(Key t, uint64_t k, const std::vector<uint64_t>& off) {
    const Key* const s = s_;
    const uint8_t* const m = m_;
    uint8_t* const out = out_;
    const Chunks ch = ch_;
    const uint64_t* const offp = off.data();
    for_each_chunk(ch, [=](int64_t c) {
      const int64_t b = ch.begin(c), e = ch.end(c);
      uint64_t rank = offp[c];
      for (int64_t i = b; i < e; ++i) {
        const Key key = Bits::to_key(s[i]);
        const uint32_t mi = m[i];
        const uint32_t eq = mi & static_cast<uint32_t>(key == t);
        const uint32_t keep =
            mi & (static_cast<uint32_t>(key > t) | (eq & static_cast<uint32_t>(rank < k)));
        rank += eq;
        out[i] = static_cast<uint8_t>(keep);
      }
    });
  }

  // Decide every entry outside bin d (top bits != prefix) and collect those inside it, then
  // keep the k best of the collected ones (key descending, index ascending).
  void collect(Key prefix, int shift, int64_t d, uint64_t k) {
    const std::vector<uint64_t> off = chunk_offsets(d);
    const uint64_t total = total_[static_cast<size_t>(d)];
    std::unique_ptr<Cand[]> buf(new Cand[static_cast<size_t>(total) + 1]);
    const Key* const s = s_;
    const uint8_t* const m = m_;
    uint8_t* const out = out_;
    const Chunks ch = ch_;
    const uint64_t* const offp = off.data();
    Cand* const bufp = buf.get();
    for_each_chunk(ch, [=](int64_t c) {
      const int64_t b = ch.begin(c), e = ch.end(c);
      Cand* dst = bufp + offp[c];
      for (int64_t i = b; i < e; ++i) {
        const Key key = Bits::to_key(s[i]);
        const uint32_t mi = m[i];
        const Key top = static_cast<Key>(key >> shift);
        out[i] = static_cast<uint8_t>(mi & static_cast<uint32_t>(top > prefix));
        if (mi & static_cast<uint32_t>(top == prefix)) *dst++ = Cand{key, i};
      }
    });
    Cand* first = bufp;
    Cand* last = first + total;
    Cand* nth = first + k;
    if (nth < last) std::nth_element(first, nth, last, better);
    for (Cand* q = first; q < nth; ++q) out[q->idx] = 1;
  }

  const Key* s_;
  const uint8_t* m_;
  uint8_t* out_;
  int64_t n_;
  Chunks ch_;
  int64_t cap_;  // most candidates collected before falling back to another pass
  std::unique_ptr<uint32_t[]> hist_;
  std::vector<uint64_t> total_;
};

// scores, mask, out: contiguous CPU tensors of length n; out may be mask itself.
void masked_topk_cpu_impl(const at::Tensor& scores, const at::Tensor& mask, const at::Tensor& out,
                          int64_t n_keep) {
  const int64_t n = scores.numel();
  if (n == 0) {
    check_n_keep(n_keep, 0);
    return;
  }
  const void* s = scores.const_data_ptr();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  uint8_t* o = reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>());
  switch (scores.scalar_type()) {
    case at::kHalf:
      MaskedTopK<HalfBits>(static_cast<const uint16_t*>(s), m, o, n).run(n_keep);
      break;
    case at::kBFloat16:
      MaskedTopK<BFloat16Bits>(static_cast<const uint16_t*>(s), m, o, n).run(n_keep);
      break;
    case at::kFloat:
      MaskedTopK<Float32Bits>(static_cast<const uint32_t*>(s), m, o, n).run(n_keep);
      break;
    case at::kDouble:
      MaskedTopK<Float64Bits>(static_cast<const uint64_t*>(s), m, o, n).run(n_keep);
      break;
    default:
      TORCH_CHECK_TYPE(false, "masked_topk: unsupported scores dtype ", scores.scalar_type());
  }
}

}  // namespace

at::Tensor masked_topk_cpu(const at::Tensor& scores, const at::Tensor& mask, int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({m.size(0)}, m.options());
  masked_topk_cpu_impl(s, m, out, n_keep);
  return out;
}

void masked_topk_cpu_(const at::Tensor& scores, at::Tensor& mask, int64_t n_keep) {
  check_topk_inputs(scores, mask, n_keep);
  const at::Tensor s = scores.contiguous();
  if (mask.is_contiguous()) {
    masked_topk_cpu_impl(s, mask, mask, n_keep);
  } else {
    at::Tensor m = mask.contiguous();
    masked_topk_cpu_impl(s, m, m, n_keep);
    mask.copy_(m);
  }
}

}  // namespace ntksap_fast

TORCH_LIBRARY(ntksap_fast, m) {
  // Fake (meta) implementations live in ntksap_fast/topk.py; torch imports it when needed.
  m.set_python_module("ntksap_fast.topk");
  m.def("masked_topk(Tensor scores, Tensor mask, int n_keep) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // The in-place op returns nothing: functionalization (torch.compile) does not support custom
  // ops whose output aliases an input. The Python wrapper ntksap_fast.topk.masked_topk_
  // returns the mask.
  m.def("masked_topk_(Tensor scores, Tensor(a!) mask, int n_keep) -> ()",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ntksap_fast, CPU, m) {
  m.impl("masked_topk", &ntksap_fast::masked_topk_cpu);
  m.impl("masked_topk_", &ntksap_fast::masked_topk_cpu_);
}
