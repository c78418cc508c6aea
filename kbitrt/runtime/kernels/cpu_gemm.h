// The prefill GEMM (docs/cpu.md, "Prefill"): y = x W^T for more than FUSED_MAX_ROWS rows of x,
// W decoded a few rows at a time into a cache-resident fp32 panel, never a whole layer.
// Included inside cpu_kernels.cpp's anonymous namespace, after with_decoder.
//
// Vectorized over the rows of x (the tokens), not over K: x is packed once per call into
// kMr-row strips, K-major ([strip][k][kMr], zero rows past M), and each worker decodes kNr-row
// groups of W into its panel (row-major, whole K: the decoder the fused kernel uses, so the
// weights are the twin's exact products). A micro tile of kMr tokens x kNr rows of W then
// streams k: one (or two) vector loads of x, a broadcast of each W value (folded into the FMA as
// an embedded broadcast), kMv x kNr FMAs into registers. K needs no vector alignment, so ragged
// K, any block size and every bit width take the same loop; ragged M and N are zero padding.
// Each output is one fp32 chain over k in order (pair order for 4 bits, as x is permuted too),
// summed across kKc panels through the worker's C tile: a fixed order, independent of threads.
#pragma once

constexpr int64_t kPanelBytes = 512 * 1024;  // a worker's decoded W rows (whole K): in L2
constexpr int64_t kKc = 256;                 // k per pass: a strip of x (kMr x kKc) stays in L1
#if defined(KBIT_SIMD) && KBIT_SIMD == 512
constexpr int kMv = 2, kNr = 12;  // 24 accumulators of 32 registers
#elif defined(KBIT_SIMD)
constexpr int kMv = 1, kNr = 6;   // 12 of 16 (a vf is two AVX2 registers)
#else
constexpr int kMv = 1, kNr = 4;
#endif
constexpr int kMr = 16 * kMv;  // tokens per micro tile

// x (M, K) into strips xp[s][k][l] = x[s*kMr + l][k], rows past M zero
inline void pack_x(const float* x, int64_t M, int64_t K, float* xp) {
  const int64_t strips = (M + kMr - 1) / kMr;
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float* out = xp + s * K * kMr;
      const int64_t rows = std::min<int64_t>(kMr, M - s * kMr);
      for (int64_t k0 = 0; k0 < K; k0 += 64) {  // 64-column bites: reads and writes in cache
        const int64_t k1 = std::min<int64_t>(K, k0 + 64);
        for (int64_t l = 0; l < kMr; ++l) {
          const float* src = x + (s * kMr + l) * K;
          for (int64_t k = k0; k < k1; ++k) out[k * kMr + l] = l < rows ? src[k] : 0.f;
        }
      }
    }
  });
}

// c[r * ldc + l] (+)= sum over k < kc of xp[k * kMr + l] * w[r * ldw + k], r < kNr, l < kMr
inline void micro_tile(const float* xp, const float* w, int64_t ldw, int64_t kc, float* c,
                       int64_t ldc, bool add) {
#ifdef KBIT_SIMD
  vf acc[kNr][kMv];
  for (int r = 0; r < kNr; ++r)
    for (int v = 0; v < kMv; ++v) acc[r][v] = add ? vload(c + r * ldc + 16 * v) : vzero();
  for (int64_t k = 0; k < kc; ++k) {
    vf xv[kMv];
    for (int v = 0; v < kMv; ++v) xv[v] = vload(xp + k * kMr + 16 * v);
    for (int r = 0; r < kNr; ++r) {
      const vf b = vset(w[r * ldw + k]);
      for (int v = 0; v < kMv; ++v) acc[r][v] = vfma(xv[v], b, acc[r][v]);
    }
  }
  for (int r = 0; r < kNr; ++r)
    for (int v = 0; v < kMv; ++v) vstore(c + r * ldc + 16 * v, acc[r][v]);
#else
  float acc[kNr][kMr];
  for (int r = 0; r < kNr; ++r)
    for (int l = 0; l < kMr; ++l) acc[r][l] = add ? c[r * ldc + l] : 0.f;
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < kNr; ++r) {
      const float b = w[r * ldw + k];
      for (int l = 0; l < kMr; ++l) acc[r][l] += xp[k * kMr + l] * b;
    }
  for (int r = 0; r < kNr; ++r)
    for (int l = 0; l < kMr; ++l) c[r * ldc + l] = acc[r][l];
#endif
}

// W rows per panel: whole groups of kNr, as many as kPanelBytes holds at this K and at least two
// (each pass over a strip of x then feeds two micro tiles or more)
inline int64_t panel_rows(int64_t K, int64_t N) {
  const int64_t groups = std::max<int64_t>(2, kPanelBytes / (K * 4 * kNr));
  return std::min(groups, (N + kNr - 1) / kNr) * kNr;
}

// y (M, N) = x W^T (+ bias) from xp (pack_x); decode(n, out) writes row n of W (K values)
template <typename Decode>
void gemm_panels(const float* xp, int64_t M, int64_t K, int64_t N, const float* bias, float* y,
                 Decode decode) {
  const int64_t nc = panel_rows(K, N), strips = (M + kMr - 1) / kMr, mp = strips * kMr;
  const int64_t tiles = (N + nc - 1) / nc;
  // workers take the next panel as they finish one: a worker slowed by the machine's other
  // work does not hold the rest up (each output is computed the same way whoever takes it)
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tiles, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> wp(nc * K), ct(nc * mp);  // the panel and its C tile (transposed)
    for (int64_t t; (t = next.fetch_add(1)) < tiles;) {
      const int64_t n0 = t * nc, rows = std::min(nc, N - n0);
      const int64_t padded = (rows + kNr - 1) / kNr * kNr;
      for (int64_t r = 0; r < rows; ++r) decode(n0 + r, wp.data() + r * K);
      std::fill(wp.begin() + rows * K, wp.begin() + padded * K, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        for (int64_t s = 0; s < strips; ++s)
          for (int64_t r0 = 0; r0 < padded; r0 += kNr)
            micro_tile(xp + (s * K + k0) * kMr, wp.data() + r0 * K + k0, K, kc,
                       ct.data() + r0 * mp + s * kMr, mp, k0 > 0);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r)
          y[m * N + n0 + r] = bias ? ct[r * mp + m] + bias[n0 + r] : ct[r * mp + m];
    }
  });
}

// kbit_linear above FUSED_MAX_ROWS rows: x checked, y (M, N) allocated by the caller
void kbit_gemm_into(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                    const at::Tensor& codebook, const float* bias, int64_t bits,
                    int64_t block_size, int64_t K, float* y) {
  const int64_t M = x.size(0), N = qweight.size(0);
  std::vector<float> xp((M + kMr - 1) / kMr * kMr * K);
  with_decoder(qweight, absmax, codebook, bits, block_size, K,
               [&](auto, auto decode, auto, bool pair) {
    const float* xs = x.data_ptr<float>();
#ifdef KBIT_SIMD
    std::vector<float> xpair(pair ? M * K : 0);  // 4 bits: x in the decoder's pair order
    for (int64_t m = 0; pair && m < M; ++m) to_pair_order(xs + m * K, K, xpair.data() + m * K);
    if (pair) xs = xpair.data();
#endif
    pack_x(xs, M, K, xp.data());
    gemm_panels(xp.data(), M, K, N, bias, y, decode);
  });
}
