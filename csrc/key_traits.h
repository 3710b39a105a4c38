// Order-preserving unsigned integer keys of IEEE floating-point values, shared by the CPU and
// CUDA implementations of the masked top-k.
//
// For a float with raw bits b (sign bit S), the key is
//   b | S   when b is non-negative,
//   ~b      when b is negative,
// so that unsigned comparison of keys equals numeric comparison of the floats. -0.0 is first
// mapped to +0.0 (the two must compare equal), +-inf are ordinary values, and NaN (exponent all
// ones, mantissa non-zero) is detected separately on the raw bits: callers reject it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NTKSAP_HD __host__ __device__ __forceinline__
#else
#define NTKSAP_HD inline
#endif

namespace ntksap_fast {

// Per-dtype description: the unsigned key type of the same width and the raw bits of +inf
// (anything whose magnitude bits exceed it is a NaN).
template <typename Key, Key kInfBits>
struct FloatBits {
  using key_t = Key;
  static constexpr int kBits = static_cast<int>(sizeof(Key) * 8);
  static constexpr Key kSign = static_cast<Key>(Key(1) << (kBits - 1));
  static constexpr Key kMag = static_cast<Key>(~kSign);
  static constexpr Key kInf = kInfBits;

  static NTKSAP_HD bool is_nan(Key b) { return static_cast<Key>(b & kMag) > kInf; }

  static NTKSAP_HD Key to_key(Key b) {
    // -0.0 -> +0.0 (arithmetic, not a branch: half the entries of a score vector may be zero),
    // then flip: all bits for negatives, only the sign bit for non-negatives.
    b = static_cast<Key>(b & static_cast<Key>(Key(0) - static_cast<Key>((b & kMag) != 0)));
    const Key neg = static_cast<Key>(Key(0) - static_cast<Key>(b >> (kBits - 1)));  // 0 or ~0
    return static_cast<Key>(b ^ static_cast<Key>(neg | kSign));
  }

  // Inverse of to_key (never yields -0.0).
  static NTKSAP_HD Key from_key(Key k) {
    return (k & kSign) ? static_cast<Key>(k ^ kSign) : static_cast<Key>(~k);
  }

  // Keys of -inf and +inf: the smallest and largest keys of non-NaN values.
  static constexpr Key kKeyMin = static_cast<Key>(~static_cast<Key>(kSign | kInf));
  static constexpr Key kKeyMax = static_cast<Key>(kSign | kInf);
};

using HalfBits = FloatBits<uint16_t, uint16_t(0x7c00u)>;
using BFloat16Bits = FloatBits<uint16_t, uint16_t(0x7f80u)>;
using Float32Bits = FloatBits<uint32_t, uint32_t(0x7f800000u)>;
using Float64Bits = FloatBits<uint64_t, uint64_t(0x7ff0000000000000ull)>;

}  // namespace ntksap_fast
