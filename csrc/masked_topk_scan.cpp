// Masked global top-k, CPU: the fused pass of the sample-bracketed path (see
// masked_topk_scan.h and masked_topk_bracket.cpp). Per block of 32 entries: the mask bits, the
// comparisons with the bracket [lo, hi], the counts (popcounts), the out bytes, the saved mask
// word (in place), and the rare candidates stored by walking the set bits. The generic body is
// written for the compiler to vectorise and is also compiled for AVX2; float32 and float64 have
// hand-written AVX2 blocks. The AVX2 code runs only where the CPU has AVX2 (checked once).
#include "masked_topk_scan.h"

#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace ntksap_fast {
namespace detail {
namespace {

// Step 1 over one chunk. The blocks compute every flag into small arrays with straight-line
// loops (vectorised by the compiler); only blocks that hold a candidate are looked at again.
template <typename Bits, bool kInPlace>
NTKSAP_ALWAYS_INLINE ChunkScan fused_body(const PassArgs<typename Bits::key_t>& a) {
  using Key = typename Bits::key_t;
  using Float = typename FloatOf<Bits>::type;
  constexpr bool kFloat = !std::is_same_v<Float, void*>;
  const Key* __restrict s = a.s;
  [[maybe_unused]] const Float* __restrict sf = reinterpret_cast<const Float*>(a.s);
  const uint8_t* m = a.m;
  uint8_t* o = a.out;
  const Key lo = a.lo, hi = a.hi;
  // float32/float64 compare as floats (equal to comparing keys for non-NaN values, -0.0 == 0.0
  // included, and cheaper); float16/bfloat16 compare keys.
  [[maybe_unused]] Float lo_f{}, hi_f{};
  if constexpr (kFloat) {
    const Key lo_b = Bits::from_key(lo), hi_b = Bits::from_key(hi);
    std::memcpy(&lo_f, &lo_b, sizeof(Float));
    std::memcpy(&hi_f, &hi_b, sizeof(Float));
  }
  ChunkScan r;
  uint32_t nan = 0;
  int64_t k = 0;
  int64_t i = a.b;
  for (; i + kBlock <= a.e; i += kBlock) {
    uint8_t mm[kBlock], keep[kBlock], in[kBlock];
    std::memcpy(mm, m + i, kBlock);
    uint32_t bc = 0, ba = 0, bi = 0, bn = 0;
    for (int j = 0; j < kBlock; ++j) {
      uint32_t above, inside, isnan;
      if constexpr (kFloat) {
        const Float x = sf[i + j];
        above = static_cast<uint32_t>(x > hi_f);
        inside = static_cast<uint32_t>(x >= lo_f) & static_cast<uint32_t>(x <= hi_f);
        isnan = static_cast<uint32_t>(x != x);
      } else {
        const Key bits = s[i + j];
        const Key key = Bits::to_key(bits);
        above = static_cast<uint32_t>(key > hi);
        inside = static_cast<uint32_t>(key >= lo) & static_cast<uint32_t>(key <= hi);
        isnan = static_cast<uint32_t>(Bits::is_nan(bits));
      }
      const uint32_t mi = mm[j];
      keep[j] = static_cast<uint8_t>(mi & above);
      in[j] = static_cast<uint8_t>(mi & inside);
      bc += mi;
      ba += mi & above;
      bi += mi & inside;
      bn |= mi & isnan;
    }
    if constexpr (kInPlace) {
      uint32_t w = 0;
      for (int j = 0; j < kBlock; ++j) w |= static_cast<uint32_t>(mm[j]) << j;
      a.backup[i / kBlock] = w;
    }
    std::memcpy(o + i, keep, kBlock);
    r.count += bc;
    r.above += ba;
    r.inr += bi;
    nan |= bn;
    if (bi != 0 && !r.overflow) {
      if (k + static_cast<int64_t>(bi) > a.cap) {
        r.overflow = true;
      } else {
        for (int j = 0; j < kBlock; ++j) {
          if (in[j]) {
            const Key key = Bits::to_key(s[i + j]);
            a.kbuf[k] = key;
            a.ibuf[k] = i + j;
            ++a.hist[static_cast<uint64_t>(static_cast<Key>(key - lo)) >> a.cshift];
            ++k;
          }
        }
      }
    }
  }
  // Tail (< kBlock entries), scalar.
  uint32_t w = 0;
  for (int64_t t = i; t < a.e; ++t) {
    const Key bits = s[t];
    const Key key = Bits::to_key(bits);
    const uint32_t mi = m[t];
    const uint32_t inside = mi & static_cast<uint32_t>(key >= lo) & static_cast<uint32_t>(key <= hi);
    const uint32_t above = mi & static_cast<uint32_t>(key > hi);
    w |= mi << (t - i);
    o[t] = static_cast<uint8_t>(above);
    r.count += mi;
    r.above += above;
    r.inr += inside;
    nan |= mi & static_cast<uint32_t>(Bits::is_nan(bits));
    if (inside && !r.overflow) {
      if (k + 1 > a.cap) {
        r.overflow = true;
      } else {
        a.kbuf[k] = key;
        a.ibuf[k] = t;
        ++a.hist[static_cast<uint64_t>(static_cast<Key>(key - lo)) >> a.cshift];
        ++k;
      }
    }
  }
  if constexpr (kInPlace) {
    if (i < a.e) a.backup[i / kBlock] = w;
  }
  r.nan = nan != 0;
  r.ncand = k;
  return r;
}

template <typename Bits, bool kInPlace>
ChunkScan fused_generic(const PassArgs<typename Bits::key_t>& a) {
  return fused_body<Bits, kInPlace>(a);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define NTKSAP_AVX2 __attribute__((target("avx2,popcnt")))

// Candidates of one block: bit j of `inside` is entry i + j; false on overflow (nothing stored).
template <typename Bits>
NTKSAP_AVX2 inline bool store_candidates(const typename Bits::key_t* s, int64_t i, uint32_t inside,
                                         typename Bits::key_t* kbuf, int64_t* ibuf, int64_t& k,
                                         int64_t cap, uint32_t* hist, typename Bits::key_t lo,
                                         int cshift) {
  using Key = typename Bits::key_t;
  if (k + __builtin_popcount(inside) > cap) return false;
  while (inside != 0) {
    const int j = __builtin_ctz(inside);
    inside &= inside - 1;
    const Key key = Bits::to_key(s[i + j]);
    kbuf[k] = key;
    ibuf[k] = i + j;
    ++hist[static_cast<uint64_t>(static_cast<Key>(key - lo)) >> cshift];
    ++k;
  }
  return true;
}

// 32 mask bytes: the vector and its bits (bit j set iff byte j != 0).
NTKSAP_AVX2 inline __m256i load_mask(const uint8_t* m, uint32_t& bits) {
  const __m256i mv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m));
  bits = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(mv, _mm256_setzero_si256())));
  return mv;
}

// Four 8-lane float32 compare results (all ones / zeros per lane) -> 32 bytes in entry order.
NTKSAP_AVX2 inline __m256i pack_cmp(__m256 c0, __m256 c1, __m256 c2, __m256 c3) {
  const __m256i p01 = _mm256_packs_epi32(_mm256_castps_si256(c0), _mm256_castps_si256(c1));
  const __m256i p23 = _mm256_packs_epi32(_mm256_castps_si256(c2), _mm256_castps_si256(c3));
  const __m256i p = _mm256_packs_epi16(p01, p23);
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Four 4-lane float64 compare results -> 16 bits in entry order.
NTKSAP_AVX2 inline uint32_t bits_pd(__m256d c0, __m256d c1, __m256d c2, __m256d c3) {
  return static_cast<uint32_t>(_mm256_movemask_pd(c0)) |
         static_cast<uint32_t>(_mm256_movemask_pd(c1)) << 4 |
         static_cast<uint32_t>(_mm256_movemask_pd(c2)) << 8 |
         static_cast<uint32_t>(_mm256_movemask_pd(c3)) << 12;
}

// Hand-written AVX2 blocks for float32 and float64 (compared as floats: for non-NaN values the
// same as comparing keys, -0.0 == 0.0 included). Per block of 32: above = x > hi, inside =
// x >= lo && !above (NaN is neither), NaN looked for once per block with unordered compares of
// pairs of vectors and counted exactly only in a block that has one. Other types: the generic
// body compiled for AVX2.
template <typename Bits, bool kInPlace>
NTKSAP_AVX2 ChunkScan fused_avx2(const PassArgs<typename Bits::key_t>& a) {
  using Key = typename Bits::key_t;
  if constexpr (std::is_same_v<Bits, Float32Bits> || std::is_same_v<Bits, Float64Bits>) {
    using Float = typename FloatOf<Bits>::type;
    constexpr bool k32 = std::is_same_v<Bits, Float32Bits>;
    Float lo_f, hi_f;
    const Key lo_b = Bits::from_key(a.lo), hi_b = Bits::from_key(a.hi);
    std::memcpy(&lo_f, &lo_b, sizeof(Float));
    std::memcpy(&hi_f, &hi_b, sizeof(Float));
    // Locals only: stores through uint8_t* could alias the argument struct.
    const Key* const s = a.s;
    const Float* const sf = reinterpret_cast<const Float*>(a.s);
    const uint8_t* const m = a.m;
    uint8_t* const out = a.out;
    uint32_t* const backup = a.backup;
    Key* const kbuf = a.kbuf;
    int64_t* const ibuf = a.ibuf;
    const int64_t cap = a.cap, e = a.e;
    uint32_t* const hist = a.hist;
    const Key lo_key = a.lo;
    const int cshift = a.cshift;
    uint64_t count = 0, n_above = 0, n_inside = 0;
    uint32_t nan = 0;
    bool overflow = false;
    int64_t k = 0;
    int64_t i = a.b;
    for (; i + kBlock <= e; i += kBlock) {
      uint32_t mbits;
      const __m256i mv = load_mask(m + i, mbits);
      uint32_t above, inside;
      __m256i keep;  // bytes: 1 where unpruned and above
      bool any_nan;
      if constexpr (k32) {
        const __m256 lo = _mm256_set1_ps(lo_f), hi = _mm256_set1_ps(hi_f);
        const __m256 v0 = _mm256_loadu_ps(sf + i), v1 = _mm256_loadu_ps(sf + i + 8);
        const __m256 v2 = _mm256_loadu_ps(sf + i + 16), v3 = _mm256_loadu_ps(sf + i + 24);
        const __m256i gt = pack_cmp(_mm256_cmp_ps(v0, hi, _CMP_GT_OQ), _mm256_cmp_ps(v1, hi, _CMP_GT_OQ),
                                    _mm256_cmp_ps(v2, hi, _CMP_GT_OQ), _mm256_cmp_ps(v3, hi, _CMP_GT_OQ));
        const __m256i ge = pack_cmp(_mm256_cmp_ps(v0, lo, _CMP_GE_OQ), _mm256_cmp_ps(v1, lo, _CMP_GE_OQ),
                                    _mm256_cmp_ps(v2, lo, _CMP_GE_OQ), _mm256_cmp_ps(v3, lo, _CMP_GE_OQ));
        keep = _mm256_and_si256(gt, mv);
        above = static_cast<uint32_t>(_mm256_movemask_epi8(gt));
        inside = static_cast<uint32_t>(_mm256_movemask_epi8(ge)) & ~above;
        const __m256 un = _mm256_or_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q), _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q));
        any_nan = !_mm256_testz_ps(un, un);
      } else {
        const __m256d lo = _mm256_set1_pd(lo_f), hi = _mm256_set1_pd(hi_f);
        uint32_t ge = 0;
        __m256d un = _mm256_setzero_pd();
        above = 0;
        for (int h = 0; h < 2; ++h) {
          const double* x = sf + i + 16 * h;
          const __m256d v0 = _mm256_loadu_pd(x), v1 = _mm256_loadu_pd(x + 4);
          const __m256d v2 = _mm256_loadu_pd(x + 8), v3 = _mm256_loadu_pd(x + 12);
          above |= bits_pd(_mm256_cmp_pd(v0, hi, _CMP_GT_OQ), _mm256_cmp_pd(v1, hi, _CMP_GT_OQ),
                           _mm256_cmp_pd(v2, hi, _CMP_GT_OQ), _mm256_cmp_pd(v3, hi, _CMP_GT_OQ))
                   << (16 * h);
          ge |= bits_pd(_mm256_cmp_pd(v0, lo, _CMP_GE_OQ), _mm256_cmp_pd(v1, lo, _CMP_GE_OQ),
                        _mm256_cmp_pd(v2, lo, _CMP_GE_OQ), _mm256_cmp_pd(v3, lo, _CMP_GE_OQ))
                << (16 * h);
          un = _mm256_or_pd(un, _mm256_or_pd(_mm256_cmp_pd(v0, v1, _CMP_UNORD_Q),
                                             _mm256_cmp_pd(v2, v3, _CMP_UNORD_Q)));
        }
        inside = ge & ~above;
        any_nan = !_mm256_testz_pd(un, un);
        // Bits -> bytes: byte j gets bit j of above.
        const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
        const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        const __m256i bv = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(above)), spread);
        keep = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bv, sel), sel), mv);
      }
      if constexpr (kInPlace) backup[i / kBlock] = mbits;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), keep);
      above &= mbits;
      inside &= mbits;
      count += static_cast<uint32_t>(__builtin_popcount(mbits));
      n_above += static_cast<uint32_t>(__builtin_popcount(above));
      n_inside += static_cast<uint32_t>(__builtin_popcount(inside));
      if (any_nan) [[unlikely]] {
        for (int j = 0; j < kBlock; ++j) {
          const Float x = sf[i + j];
          nan |= static_cast<uint32_t>((mbits >> j) & 1u) & static_cast<uint32_t>(x != x);
        }
      }
      if (inside != 0 && !overflow)
        overflow = !store_candidates<Bits>(s, i, inside, kbuf, ibuf, k, cap, hist, lo_key, cshift);
    }
    ChunkScan r;
    if (i < e) {  // tail: the generic body on the rest
      PassArgs<Key> t = a;
      t.b = i;
      t.kbuf += k;
      t.ibuf += k;
      t.cap = overflow ? 0 : cap - k;
      r = fused_body<Bits, kInPlace>(t);
      k += r.ncand;
    }
    r.count += count;
    r.above += n_above;
    r.inr += n_inside;
    r.nan = r.nan || nan != 0;
    r.overflow = r.overflow || overflow;
    r.ncand = k;
    return r;
  } else {
    return fused_body<Bits, kInPlace>(a);
  }
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  }();
  return has;
}
#endif

template <typename Bits, bool kInPlace>
ChunkScan dispatch(const PassArgs<typename Bits::key_t>& a) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2()) return fused_avx2<Bits, kInPlace>(a);
#endif
  return fused_generic<Bits, kInPlace>(a);
}

}  // namespace

template <typename Bits>
ChunkScan fused_pass(const PassArgs<typename Bits::key_t>& a, bool in_place) {
  return in_place ? dispatch<Bits, true>(a) : dispatch<Bits, false>(a);
}

template ChunkScan fused_pass<HalfBits>(const PassArgs<uint16_t>&, bool);
template ChunkScan fused_pass<BFloat16Bits>(const PassArgs<uint16_t>&, bool);
template ChunkScan fused_pass<Float32Bits>(const PassArgs<uint32_t>&, bool);
template ChunkScan fused_pass<Float64Bits>(const PassArgs<uint64_t>&, bool);


}  // namespace detail
}  // namespace ntksap_fast
