// The csrc/ kernel bodies run on the CPU (one std::thread per CUDA thread) against a float64 reference.
#include "sim.h"
#include "adaln_modulate.cuh"
#include "linear_attention.cuh"
#include <cstdio>
#include <random>
#include <algorithm>
using namespace dit;
static std::mt19937 rng(0);
template <class T> float tf(T v) { return (float)to_float(v); }
template <class T> std::vector<T> randv(size_t n, float s, float m) {
  std::normal_distribution<float> nd; std::vector<T> v(n); for (auto& x : v) x = from_float<T>(nd(rng) * s + m); return v; }
template <class T> double ulp_tol(double v) { return sizeof(T) == 4 ? 1e-5 * std::abs(v) + 2e-5 : (std::is_same<T,__half>::value ? std::ldexp(1.0, -9) : std::ldexp(1.0, -6)) * std::abs(v) + 1e-4; }
int fails = 0;

template <class T> void test_adaln(int B, int N, int D, bool residual, int offset) {
  size_t n = size_t(B) * N * D;
  auto xb = randv<T>(n + offset, 3, 1), yb = randv<T>(n + offset, 1, 0);
  auto gate = randv<T>(B * D + offset, .5, 0), shift = randv<T>(B * D + offset, .5, 0), scale = randv<T>(B * D + offset, .5, 0);
  std::vector<T> hb(n + offset), ob(n + offset);
  T *x = xb.data() + offset, *y = yb.data() + offset, *g = gate.data() + offset, *sh = shift.data() + offset, *sc = scale.data() + offset, *h = hb.data() + offset, *o = ob.data() + offset;
  int tx = adaln_threads_x(D, sizeof(T)), ty = adaln_rows_per_block(tx);
  SimDim3 grid{unsigned((B * N + ty - 1) / ty)}, block{unsigned(tx), unsigned(ty)};
  if (residual) sim_launch(grid, block, [=] { adaln_modulate_residual_body<T>(x, y, g, sh, sc, h, o, B, N, D, 1e-6f); });
  else sim_launch(grid, block, [=] { adaln_modulate_body<T>(x, sh, sc, o, B, N, D, 1e-6f); });
  double worst = 0;
  for (int r = 0; r < B * N; ++r) {
    int b = r / N; std::vector<double> row(D);
    for (int j = 0; j < D; ++j) {
      if (residual) {
        float hv = tf(x[r * D + j]) + tf(g[b * D + j]) * tf(y[r * D + j]);
        T ht = from_float<T>(hv);
        if (tf(ht) != tf(h[r * D + j])) { if (fails++ < 5) printf("h mismatch r%d j%d\n", r, j); }
        row[j] = tf(ht);
      } else row[j] = tf(x[r * D + j]);
    }
    double mean = 0; for (double v : row) mean += v; mean /= D;
    double var = 0; for (double v : row) var += (v - mean) * (v - mean); var /= D;
    for (int j = 0; j < D; ++j) {
      double e = (row[j] - mean) / std::sqrt(var + 1e-6) * (1 + tf(sc[b * D + j])) + tf(sh[b * D + j]);
      double got = tf(o[r * D + j]);
      double err = std::abs(got - e) / ulp_tol<T>(e);
      worst = std::max(worst, err);
    }
  }
  bool ok = worst <= 1; fails += !ok;
  printf("%s adaln%s T%zu B%d N%d D%d off%d tx%d ty%d worst/tol=%.3f\n", ok ? "ok  " : "FAIL", residual ? "_res" : "", sizeof(T), B, N, D, offset, tx, ty, worst);
}

template <class T, int DK> void test_la(int B, int H, int N, int d, int splits, int offset) {
  size_t n = size_t(B) * H * N * d;
  auto qb = randv<T>(n + offset, 1, 0), kb = randv<T>(n + offset, 1, 0), vb = randv<T>(n + offset, 1, 0);
  std::vector<T> ob(n + offset);
  T *q = qb.data() + offset, *k = kb.data() + offset, *v = vb.data() + offset, *o = ob.data() + offset;
  unsigned slabs = B * H;
  if (splits <= 1) {
    sim_launch({slabs}, {unsigned(kLAThreads)}, [=] { linear_attention_fused<T, DK>(q, k, v, o, N, d, 1e-15f); });
  } else {
    constexpr int SZ = DK * LAShape<DK>::DV;
    std::vector<float> part(size_t(slabs) * splits * SZ);
    float* p = part.data();
    int64_t chunk = (N + splits - 1) / splits;
    sim_launch({slabs, unsigned(splits)}, {unsigned(kLAThreads)}, [=] { linear_attention_partial<T, DK>(k, v, p, N, d, chunk); });
    int64_t chunk2 = 100;
    sim_launch({slabs, unsigned((N + chunk2 - 1) / chunk2)}, {unsigned(kLAThreads)}, [=] { linear_attention_apply<T, DK>(q, p, o, N, d, splits, chunk2, 1e-15f); });
  }
  double worst = 0, scale = 0; std::vector<double> ex(n);
  for (unsigned s = 0; s < slabs; ++s) {
    size_t base = size_t(s) * N * d;
    std::vector<double> kv(d * d, 0), ks(d, 0);
    for (int m = 0; m < N; ++m) for (int i = 0; i < d; ++i) {
      double kk = std::max(0.f, tf(k[base + m * d + i])); ks[i] += kk;
      for (int j = 0; j < d; ++j) kv[i * d + j] += kk * tf(v[base + m * d + j]); }
    for (int m = 0; m < N; ++m) {
      double den = 0; for (int i = 0; i < d; ++i) den += std::max(0.f, tf(q[base + m * d + i])) * ks[i];
      for (int j = 0; j < d; ++j) { double num = 0; for (int i = 0; i < d; ++i) num += std::max(0.f, tf(q[base + m * d + i])) * kv[i * d + j];
        ex[base + m * d + j] = num / std::max(den, 1e-15); scale = std::max(scale, std::abs(ex[base + m * d + j])); }
    }
  }
  double rt = sizeof(T) == 4 ? 1e-5 : (std::is_same<T,__half>::value ? std::ldexp(1.0, -9) : std::ldexp(1.0, -6));
  for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(tf(o[i]) - ex[i]) / (rt * std::abs(ex[i]) + 1e-5 * scale));
  bool ok = worst <= 1; fails += !ok;
  printf("%s la T%zu DK%d B%d H%d N%d d%d splits%d off%d worst/tol=%.3f\n", ok ? "ok  " : "FAIL", sizeof(T), DK, B, H, N, d, splits, offset, worst);
}

template <class T> void all() {
  for (int D : {64, 72, 1151, 1152, 2240, 3072}) for (int res : {0, 1}) test_adaln<T>(2, 3, D, res, 0);
  test_adaln<T>(3, 5, 1152, false, 1); test_adaln<T>(1, 2, 1152, true, 1);
  test_adaln<T>(2, 2, sizeof(T) == 4 ? 8192 : 16384, false, 0);
  test_adaln<T>(1, 2, sizeof(T) == 4 ? 8191 : 16383, true, 0);
  test_la<T, 8>(1, 2, 17, 8, 1, 0); test_la<T, 8>(1, 1, 5, 3, 1, 0); test_la<T, 8>(1, 1, 1, 8, 1, 0);
  test_la<T, 16>(1, 1, 300, 16, 1, 0); test_la<T, 16>(1, 1, 300, 9, 1, 0);
  test_la<T, 32>(2, 1, 300, 32, 1, 0); test_la<T, 32>(1, 1, 300, 32, 1, 1); test_la<T, 32>(1, 2, 1000, 32, 3, 0);
  test_la<T, 64>(1, 1, 200, 33, 1, 0); test_la<T, 64>(1, 1, 200, 64, 1, 0); test_la<T, 64>(1, 2, 500, 64, 4, 0);
}
int main() { all<float>(); all<__half>(); all<__nv_bfloat16>(); printf("fails=%d\n", fails); return fails != 0; }
