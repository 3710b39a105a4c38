// Philox-4x32-10 standard normals on the CPU: the compiled twin of ntksap_fast/engine/rng.py.
//
// Same counters and the same Box-Muller as the PyTorch twin (key = two 32-bit words of the seed,
// counter = (block lo, block hi, round, tag), block = element / 4, lane = element % 4); the
// 32-bit words are identical, the normals agree to a few float32 ulps (libm vs SLEEF log/sin/cos).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/enum_tag.h>

#include <cmath>
#include <cstdint>

namespace {

// The constants of ntksap_fast/engine/rng.py (PHILOX_*; tests/engine/test_rng.py checks that they agree).
constexpr int kRounds = 10;
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key increments (Weyl sequence)

struct Words {
  uint32_t w[4];
};

inline Words philox(uint64_t block, uint32_t round, uint32_t tag, uint32_t k0, uint32_t k1) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = round, c3 = tag;
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// Four normals of one block, exactly the twin's float32 formula.
inline void box_muller(const Words& w, float out[4]) {
  constexpr float kScale = 5.9604644775390625e-08f;  // 2^-24
  constexpr float kTwoPi = static_cast<float>(2.0 * M_PI);
  for (int pair = 0; pair < 2; ++pair) {
    const float u = static_cast<float>((w.w[2 * pair] >> 8) + 1u) * kScale;
    const float v = static_cast<float>(w.w[2 * pair + 1] >> 8) * kScale;
    const float r = std::sqrt(-2.0f * std::log(u));
    const float a = kTwoPi * v;
    out[2 * pair] = r * std::cos(a);
    out[2 * pair + 1] = r * std::sin(a);
  }
}

void check_word(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0 && value < (int64_t{1} << 32), name, " must be in [0, 2**32), got ", value);
}

// Normals of elements offset .. offset + numel - 1: float32 tensor (numel,).
at::Tensor philox_normal(int64_t key0, int64_t key1, int64_t round, int64_t tag, int64_t offset, int64_t numel) {
  check_word(key0, "key0");
  check_word(key1, "key1");
  check_word(round, "round");
  check_word(tag, "tag");
  TORCH_CHECK_VALUE(offset >= 0 && numel >= 0, "offset and numel must be >= 0");
  at::Tensor out = at::empty({numel}, at::kFloat);
  float* dst = out.data_ptr<float>();
  const int64_t first = offset / 4, last = numel ? (offset + numel - 1) / 4 : first - 1;
  at::parallel_for(first, last + 1, 2048, [&](int64_t begin, int64_t end) {
    float values[4];
    for (int64_t b = begin; b < end; ++b) {
      box_muller(philox(static_cast<uint64_t>(b), round, tag, key0, key1), values);
      for (int lane = 0; lane < 4; ++lane) {
        const int64_t e = 4 * b + lane - offset;
        if (e >= 0 && e < numel) dst[e] = values[lane];
      }
    }
  });
  return out;
}

// Normals at arbitrary element indices (int64, any shape): float32, same shape.
at::Tensor philox_normal_at(int64_t key0, int64_t key1, int64_t round, int64_t tag, const at::Tensor& index) {
  check_word(key0, "key0");
  check_word(key1, "key1");
  check_word(round, "round");
  check_word(tag, "tag");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), at::kFloat);
  const int64_t* src = idx.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, idx.numel(), 2048, [&](int64_t begin, int64_t end) {
    float values[4];
    for (int64_t i = begin; i < end; ++i) {
      TORCH_CHECK_VALUE(src[i] >= 0, "index must be >= 0");
      box_muller(philox(static_cast<uint64_t>(src[i]) >> 2, round, tag, key0, key1), values);
      dst[i] = values[src[i] & 3];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ntksap_fast, m) {
  // Fake (meta) implementations live in ntksap_fast/engine/rng.py; torch imports it when needed.
  m.set_python_module("ntksap_fast.engine.rng");
  m.def("philox_normal(int key0, int key1, int round, int tag, int offset, int numel) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("philox_normal_at(int key0, int key1, int round, int tag, Tensor index) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// philox_normal has no tensor argument to dispatch on: one kernel for every key (and for a call
// without tensors), which makes a CPU tensor, as a factory op with device="cpu" does.
TORCH_LIBRARY_IMPL(ntksap_fast, CompositeExplicitAutograd, m) {
  m.impl("philox_normal", &philox_normal);
}

// The index must be a CPU tensor (another device has no kernel: NotImplementedError).
TORCH_LIBRARY_IMPL(ntksap_fast, CPU, m) {
  m.impl("philox_normal_at", &philox_normal_at);
}
