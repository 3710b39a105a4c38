// C++ test of torch.ops.ntksap_fast.masked_topk / masked_topk_ (run by ctest, see
// CMakeLists.txt). Calls the ops through the dispatcher, as Python does, and compares with a
// selection written here: std::stable_sort of the unpruned indices by score, descending (ties
// keep index order; -0.0 == 0.0 since the comparison is on doubles). Data errors come back in
// the status [count, nan]; argument errors are thrown.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

int g_checks = 0;
int g_failures = 0;

#define EXPECT(cond, ...)                                                         \
  do {                                                                           \
    ++g_checks;                                                                  \
    if (!(cond)) {                                                               \
      ++g_failures;                                                              \
      std::fprintf(stderr, "FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond);      \
      std::fprintf(stderr, __VA_ARGS__);                                         \
      std::fprintf(stderr, "\n");                                                \
    }                                                                            \
  } while (0)

std::tuple<at::Tensor, at::Tensor> op_topk_status(const at::Tensor& s, const at::Tensor& m, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ntksap_fast::masked_topk", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(s, m, k);
}

at::Tensor op_topk(const at::Tensor& s, const at::Tensor& m, int64_t k) {
  return std::get<0>(op_topk_status(s, m, k));
}

// Returns the status [count, nan].
at::Tensor op_topk_(const at::Tensor& s, at::Tensor& m, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ntksap_fast::masked_topk_", "")
                       .typed<at::Tensor(const at::Tensor&, at::Tensor&, int64_t)>();
  return op.call(s, m, k);
}

bool status_is(const at::Tensor& st, int64_t count, int64_t nan) {
  return st.device().is_cpu() && st.scalar_type() == at::kLong && st.numel() == 2 &&
         st[0].item<int64_t>() == count && st[1].item<int64_t>() == nan;
}

// The selection the ops must reproduce.
std::vector<uint8_t> reference(const at::Tensor& scores, const at::Tensor& mask, int64_t k) {
  const at::Tensor s = scores.to(at::kCPU).to(at::kDouble).contiguous();
  const at::Tensor m = mask.to(at::kCPU).contiguous();
  const double* sv = s.const_data_ptr<double>();
  const bool* mv = m.const_data_ptr<bool>();
  const int64_t n = s.numel();
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < n; ++i)
    if (mv[i]) idx.push_back(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return sv[a] > sv[b]; });
  std::vector<uint8_t> out(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < k; ++j) out[static_cast<size_t>(idx[static_cast<size_t>(j)])] = 1;
  return out;
}

int64_t count_true(const at::Tensor& mask) { return mask.sum().item<int64_t>(); }

// Both ops (out of place and in place) against the reference.
void expect_topk(const std::string& name, const at::Tensor& scores, const at::Tensor& mask,
                 int64_t k) {
  const std::vector<uint8_t> want = reference(scores, mask, k);
  const at::Tensor m0 = mask.clone();
  const int64_t count = count_true(mask);
  const auto [got, st] = op_topk_status(scores, mask, k);
  at::Tensor inplace = mask.clone();
  const at::Tensor st_ = op_topk_(scores, inplace, k);
  EXPECT(at::equal(mask, m0), "%s: out-of-place op modified mask", name.c_str());
  EXPECT(status_is(st, count, 0) && status_is(st_, count, 0), "%s: status", name.c_str());
  for (const at::Tensor& t : {got, inplace}) {
    const at::Tensor c = t.to(at::kCPU).contiguous();
    EXPECT(c.scalar_type() == at::kBool && c.numel() == mask.numel(), "%s: bad output",
          name.c_str());
    const bool* cv = c.const_data_ptr<bool>();
    int64_t first_bad = -1, kept = 0;
    for (int64_t i = 0; i < c.numel(); ++i) {
      kept += cv[i];
      if (first_bad < 0 && static_cast<uint8_t>(cv[i]) != want[static_cast<size_t>(i)])
        first_bad = i;
    }
    EXPECT(first_bad < 0, "%s (n=%lld, k=%lld): first mismatch at %lld", name.c_str(),
          static_cast<long long>(mask.numel()), static_cast<long long>(k),
          static_cast<long long>(first_bad));
    EXPECT(kept == k, "%s: kept %lld, want %lld", name.c_str(), static_cast<long long>(kept),
          static_cast<long long>(k));
  }
}

template <typename Exc>
bool throws(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const Exc& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  } catch (...) {
    return false;
  }
  return false;
}

std::vector<int64_t> keeps(int64_t count) {
  std::vector<int64_t> ks = {0, 1, count / 3, count / 2, count - 1, count};
  ks.erase(std::remove_if(ks.begin(), ks.end(), [&](int64_t k) { return k < 0 || k > count; }),
           ks.end());
  std::sort(ks.begin(), ks.end());
  ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
  return ks;
}

void run_all(const at::Device& dev) {
  const std::string d = dev.str();
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::manual_seed(0);

  // Random values, every dtype, sizes that divide nothing (and above the threading threshold).
  for (at::ScalarType dt : {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}) {
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(1000), int64_t(70001), int64_t(300007),
                      (int64_t(1) << 21) + 3}) {
      const at::Tensor s = at::randn({n}, fopt).to(dt).to(dev);
      const at::Tensor m = (at::rand({n}, fopt) < 0.7).to(dev);
      const int64_t count = count_true(m);
      for (int64_t k : n < (int64_t(1) << 20) ? keeps(count) : std::vector<int64_t>{count / 3})
        expect_topk(d + " random " + c10::toString(dt), s, m, k);
    }
  }
  // Heavy ties, all equal.
  for (int64_t n : {int64_t(1000), int64_t(300007)}) {
    const at::Tensor s = at::randint(0, 3, {n}, fopt).to(dev);
    const at::Tensor m = (at::rand({n}, fopt) < 0.8).to(dev);
    for (int64_t k : keeps(count_true(m))) expect_topk(d + " ties", s, m, k);
    const at::Tensor e = at::full({n}, 0.5, fopt).to(dev);
    for (int64_t k : keeps(count_true(m))) expect_topk(d + " all equal", e, m, k);
  }
  // +-inf, signed zeros, extremes.
  {
    const int64_t n = 5000;
    at::Tensor s = at::randn({n}, fopt);
    const at::Tensor r = at::rand({n}, fopt);
    s.masked_fill_(r < 0.1, std::numeric_limits<float>::infinity());
    s.masked_fill_(r > 0.9, -std::numeric_limits<float>::infinity());
    s.masked_fill_((r > 0.4) & (r < 0.5), -0.0);
    s.masked_fill_((r > 0.5) & (r < 0.6), 0.0);
    const at::Tensor m = at::rand({n}, fopt) < 0.9;
    for (at::ScalarType dt : {at::kHalf, at::kFloat, at::kDouble})
      for (int64_t k : keeps(count_true(m)))
        expect_topk(d + " inf/zeros", s.to(dt).to(dev), m.to(dev), k);
    const at::Tensor z = at::tensor({-0.0f, 0.0f, -0.0f, 1.0f, 0.0f}).to(dev);
    const at::Tensor all = at::ones({5}, at::TensorOptions().dtype(at::kBool)).to(dev);
    const at::Tensor got = op_topk(z, all, 3).to(at::kCPU);
    EXPECT(got[0].item<bool>() && got[1].item<bool>() && !got[2].item<bool>() &&
              got[3].item<bool>() && !got[4].item<bool>(),
          "%s: -0.0 and 0.0 must tie (lower index wins)", d.c_str());
  }
  // Everything pruned, empty, non-contiguous.
  {
    const at::Tensor s = at::randn({1000}, fopt).to(dev);
    const at::Tensor none = at::zeros({1000}, at::TensorOptions().dtype(at::kBool)).to(dev);
    expect_topk(d + " all pruned", s, none, 0);
    const at::Tensor es = at::empty({0}, fopt).to(dev);
    const at::Tensor em = at::empty({0}, at::TensorOptions().dtype(at::kBool)).to(dev);
    EXPECT(op_topk(es, em, 0).numel() == 0, "%s: empty", d.c_str());
    const at::Tensor base = at::randn({300007, 3}, fopt).to(dev);
    const at::Tensor mbase = (at::rand({2, 300007}, fopt) < 0.5).to(dev);
    const at::Tensor sv = base.select(1, 1), mv = mbase.select(0, 1);
    expect_topk(d + " strided", sv, mv, count_true(mv) / 2);
    at::Tensor mstrided = (at::rand({300007, 2}, fopt) < 0.5).to(dev).select(1, 0);
    const std::vector<uint8_t> want = reference(sv, mstrided, count_true(mstrided) / 3);
    op_topk_(sv, mstrided, count_true(mstrided) / 3);
    const at::Tensor c = mstrided.to(at::kCPU).contiguous();
    bool same = true;
    for (int64_t i = 0; i < c.numel(); ++i)
      same = same && static_cast<uint8_t>(c.const_data_ptr<bool>()[i]) == want[i];
    EXPECT(same, "%s: in place through a strided mask", d.c_str());
  }
  // Data errors: status only, mask unchanged / result all False.
  for (int64_t n : {int64_t(200000), (int64_t(1) << 21) + 5}) {
    at::Tensor s = at::randn({n}, fopt);
    s[12345] = std::numeric_limits<float>::quiet_NaN();
    at::Tensor m = at::ones({n}, at::TensorOptions().dtype(at::kBool));
    const at::Tensor sd = s.to(dev);
    at::Tensor md = m.to(dev);
    const auto [out, st] = op_topk_status(sd, md, 10);
    EXPECT(status_is(st, n, 1) && count_true(out) == 0, "%s: NaN", d.c_str());
    EXPECT(status_is(op_topk_(sd, md, 10), n, 1), "%s: NaN_", d.c_str());
    EXPECT(count_true(md) == n, "%s: mask changed by a failing call", d.c_str());
    const auto [out2, st2] = op_topk_status(sd, md, n + 1);
    EXPECT(status_is(st2, n, 1) && count_true(out2) == 0, "%s: NaN and k > count", d.c_str());
    m[12345] = false;  // NaN at a pruned entry is ignored
    expect_topk(d + " NaN pruned", sd, m.to(dev), 1000);
    at::Tensor mp = m.to(dev);
    EXPECT(status_is(op_topk_(sd, mp, n), n - 1, 0) && count_true(mp) == n - 1, "%s: k > count",
          d.c_str());
  }
  // Argument errors: thrown.
  {
    const at::Tensor sd = at::randn({1000}, fopt).to(dev);
    at::Tensor md = at::ones({1000}, at::TensorOptions().dtype(at::kBool)).to(dev);
    EXPECT(throws<c10::ValueError>([&] { op_topk(sd, md, -1); }, "n_keep"), "%s: k < 0",
          d.c_str());
    EXPECT(throws<c10::TypeError>([&] { op_topk(sd.to(at::kInt), md, 1); }, "scores"),
          "%s: int scores", d.c_str());
    EXPECT(throws<c10::TypeError>([&] { op_topk(sd, md.to(at::kByte), 1); }, "mask"),
          "%s: uint8 mask", d.c_str());
    EXPECT(throws<c10::ValueError>([&] { op_topk(sd.view({2, -1}), md, 1); }, "1-D"),
          "%s: 2-D scores", d.c_str());
    EXPECT(throws<c10::ValueError>([&] { op_topk(sd.narrow(0, 0, 10), md, 1); }, "same length"),
          "%s: lengths", d.c_str());
  }
}

}  // namespace

int main() {
  std::vector<at::Device> devices = {at::Device(at::kCPU)};
  if (at::hasCUDA()) devices.emplace_back(at::kCUDA);
  for (const at::Device& dev : devices) {
    try {
      run_all(dev);
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "FAIL: unexpected exception on %s: %s\n", dev.str().c_str(), e.what());
    }
  }
  std::printf("test_masked_topk: %d checks, %d failures (devices:", g_checks, g_failures);
  for (const at::Device& dev : devices) std::printf(" %s", dev.str().c_str());
  std::printf(")\n");
  return g_failures == 0 ? 0 : 1;
}
