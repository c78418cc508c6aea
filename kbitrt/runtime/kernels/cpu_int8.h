// 8-bit activations with integer dot products for the fused decode path (docs/cpu.md, "int8
// activations"). Included inside cpu_kernels.cpp's anonymous namespace after the fp32 kernels.
//
// The arithmetic (twin: kernels/int8_reference.py, same names):
// - x, per row, in groups of 32 values: amax = max |x|, xq = rint(x * (127 / amax)) in int8, and
//   the group scale d = amax / 127 * cmax / 127 (zero groups: xq = 0, d = 0);
// - the codebook as int8: cbq[c] = rint(cb[c] * 127 / cmax), cmax = max |cb| (a non-uniform one,
//   nf/fp, keeps its shape at 8 bits; the rounding is the path's only weight-side error);
// - y[m, n] = sum over groups g of absmax[n, block of g] * d[m, g] * S[m, n, g], S the exact int32
//   sum of cbq[code] * xq over the group.
// Vector paths: AVX-512 VBMI + VNNI (codes -> cbq + 128 as bytes by vpermb / vpermi2b at any
// width, vpdpbusd with the -128 * sum(xq) correction as its starting value, 64 codes a step),
// AVX2 (vpshufb lookups, maddubs with the sign trick, 32 codes a step), portable loops elsewhere.
// The int32 sums are exact on every path; the fp32 sums differ by rounding only. y[m] does not
// depend on M (one accumulator per row pair in one fixed order), as on the fp32 path.
#pragma once

// x86 only: AVX-512 with VBMI + VNNI, else the AVX2 loops (AVX-512 without them included);
// NEON (KBIT_SIMD == 128) and the portable build take the scalar loops
#if KBIT_SIMD == 512 && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
#define KBIT_INT8 512
#elif KBIT_SIMD == 256 || KBIT_SIMD == 512
#define KBIT_INT8 256
#endif

constexpr int kGroup = 32;  // activation values per int8 scale

// what the int8 path computes with for one call: the int8 codebook and x quantized per group
struct Int8Tables {
  alignas(64) uint8_t u8[256];  // cbq + 128 (vpdpbusd's unsigned operand)
  alignas(64) int8_t s8[256];   // cbq
  float cfac;                   // cmax / 127
  // 8 bits with cbq[c] == c - 127 (the `int` data type's 255 levels): the AVX2 rows subtract
  // instead of looking up (16 vpshufb and 15 blends per 32 codes otherwise)
  bool linear8;
};

void int8_tables(const float* cb, int bits, Int8Tables& t) {
  float cmax = 0.f;
  for (int c = 0; c < (1 << bits); ++c) cmax = std::max(cmax, std::fabs(cb[c]));
  const float inv = cmax > 0.f ? 127.f / cmax : 0.f;
  for (int c = 0; c < 256; ++c) {
    const float v = c < (1 << bits) ? std::nearbyint(cb[c] * inv) : 0.f;
    const int q = static_cast<int>(std::min(127.f, std::max(-127.f, v)));
    t.s8[c] = static_cast<int8_t>(q);
    t.u8[c] = static_cast<uint8_t>(q + 128);
  }
  t.cfac = cmax / 127.f;
  // the int data type at 8 bits (padded affine: cb[c] = (c - 127) * step, kernels/reference.py
  // pad_codebook): cbq = c - 127 and cfac = step, exact, and no lookups on AVX2
  // (cb holds 1 << bits values: entries 127 and 255 are read at 8 bits only)
  const float step = bits == 8 ? (cb[255] - cb[0]) / 255.f : 0.f;
  t.linear8 = bits == 8 && step > 0.f && cb[127] == 0.f;
  for (int c = 0; c < 256 && t.linear8; ++c)
    t.linear8 = std::fabs(cb[c] - (c - 127) * step) <= 1e-6f * std::fabs(cb[0]);
  if (t.linear8) {
    for (int c = 0; c < 256; ++c) {
      t.s8[c] = static_cast<int8_t>(std::min(c - 127, 127));  // 255: padding, never a code
      t.u8[c] = static_cast<uint8_t>(t.s8[c] + 128);
    }
    t.cfac = step;
  }
}

// x (M, K) quantized: row m's kx bytes (K padded with zeros to a multiple of 64) at q + m * kx,
// its kx / 32 group scales at d + m * kx / 32; for AVX-512 also per int32 lane (4 bytes) its
// group's scale (dl) and -128 * the sum of its 4 bytes (nc), kx / 4 each per row
struct QuantX {
  int64_t kx;
  std::vector<int8_t> q;
  std::vector<float> d, dl;
  std::vector<int32_t> nc;
  // 4-bit weights on AVX-512 (pair4_tile): x's bytes in each whole 128 (then a last whole 64) of
  // K as the even positions, then the odd ones, the order two nibble masks give W's codes in;
  // per 8 bytes of K, -128 * their sum (nc8) and their group's scale (dl8), kx / 8 each per row
  std::vector<int8_t> qp;
  std::vector<float> dl8;
  std::vector<int32_t> nc8;
};

void quantize_x(const float* x, int64_t M, int64_t K, float cfac, QuantX& out) {
  const int64_t kx = (K + 63) / 64 * 64, ng = kx / kGroup;
  out.kx = kx;
  out.q.assign(M * kx, 0);
  out.d.assign(M * ng, 0.f);
  out.dl.assign(M * kx / 4, 0.f);
  out.nc.assign(M * kx / 4, 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* q = out.q.data() + m * kx;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t i0 = g * kGroup, i1 = std::min(K, i0 + kGroup);
      float amax = 0.f;
      for (int64_t i = i0; i < i1; ++i) amax = std::max(amax, std::fabs(xr[i]));
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t i = i0; i < i1; ++i)
        q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(xr[i] * id))));
      const float d = amax / 127.f * cfac;
      out.d[m * ng + g] = d;
      for (int64_t l = i0 / 4; l < (i0 + kGroup) / 4; ++l) {
        out.dl[m * kx / 4 + l] = d;
        out.nc[m * kx / 4 + l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
      }
    }
  }
}

// QuantX's pair layout (qp, nc8, dl8) from its q and d: the whole `big`s of K (128: AVX-512,
// 64: AVX2), then 64s
void pair_layout(int64_t M, int64_t K, QuantX& qx, int64_t big = 128) {
  const int64_t kx = qx.kx, ng = kx / kGroup, full128 = K / big * big;
  qx.qp.assign(M * kx, 0);
  qx.nc8.assign(M * kx / 8, 0);
  qx.dl8.assign(M * kx / 8, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* q = qx.q.data() + m * kx;
    int8_t* p = qx.qp.data() + m * kx;
    for (int64_t c0 = 0; c0 < kx; c0 += (c0 < full128 ? big : 64)) {
      const int64_t half = c0 < full128 ? big / 2 : 32;
      for (int64_t i = 0; i < half; ++i) {
        p[c0 + i] = q[c0 + 2 * i];
        p[c0 + half + i] = q[c0 + 2 * i + 1];
      }
    }
    for (int64_t l = 0; l < kx / 8; ++l) {
      int32_t sum = 0;
      for (int i = 0; i < 8; ++i) sum += q[8 * l + i];
      qx.nc8[m * kx / 8 + l] = -128 * sum;
      qx.dl8[m * kx / 8 + l] = qx.d[m * ng + 8 * l / kGroup];
    }
  }
}

// the scalar part of a row: groups from i0 (a multiple of 32) to K
template <int BITS, typename ST>
float int8_tail(const uint8_t* row, const ST* scale, const Int8Tables& t, int64_t K, int64_t kp,
                int64_t B, const int8_t* xq, const float* d, int64_t i0) {
  float acc = 0.f;
  for (int64_t g0 = i0; g0 < K; g0 += kGroup) {
    int32_t s = 0;
    for (int64_t i = g0; i < K && i < g0 + kGroup; ++i) s += t.s8[code_at<BITS>(row, kp, i)] * xq[i];
    acc = std::fma(static_cast<float>(s), d[g0 / kGroup] * to_float(scale[g0 / B]), acc);
  }
  return acc;
}

// the 4-bit pair tiles' end: each accumulator's lane sum, plus int8_tail from `from` on
template <int R, int MT, typename Acc, typename LaneSum, typename ST>
void pair4_finish(Acc (&acc)[R][MT], LaneSum lane_sum, const uint8_t* q, int64_t row_bytes,
                  const ST* scale, int64_t nb, const Int8Tables& t, int64_t K, int64_t B,
                  const QuantX& qx, int64_t m0, int64_t from, float* out /* [R][MT] */) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const int64_t o = (m0 + m) * qx.kx;
      out[r * MT + m] = lane_sum(acc[r][m]) +
          int8_tail<4>(q + r * row_bytes, scale + r * nb, t, K, (K + 7) / 8 * 8, B,
                       qx.q.data() + o, qx.d.data() + o / kGroup, from);
    }
}

#if KBIT_INT8 == 512
// the 64 codes j..j+63 (j % 64 == 0) as bytes, in order
template <int BITS>
inline __m512i codes64(const uint8_t* row, int64_t kp, int64_t j) {
  __m512i c = _mm512_setzero_si512();
  for (int t = 0; t < Layout<BITS>::n; ++t) {
    const Slice s = Layout<BITS>::s[t];
    const uint8_t* src = row + s.offset * (kp / 8) + j * s.width / 8;
    prefetch_line(src + 64 * s.width);  // 8 steps of 64 codes on
    __m512i v;
    if (s.width == 8) {
      v = _mm512_loadu_si512(src);
    } else if (s.width == 4) {  // 16-bit lane b: byte b; its high nibble moved to the next byte
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      v = _mm512_and_si512(_mm512_or_si512(w, _mm512_slli_epi16(w, 4)), _mm512_set1_epi8(0x0F));
    } else if (s.width == 2) {  // 32-bit lane b: byte b, its 2-bit fields moved to bytes 0..3
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      v = _mm512_or_si512(_mm512_or_si512(w, _mm512_slli_epi32(w, 6)),
                          _mm512_or_si512(_mm512_slli_epi32(w, 12), _mm512_slli_epi32(w, 18)));
      v = _mm512_and_si512(v, _mm512_set1_epi8(0x03));
    } else {  // one bit a code: the 64 bits are a byte mask
      uint64_t b;
      std::memcpy(&b, src, 8);
      v = _mm512_maskz_mov_epi8(b, _mm512_set1_epi8(1));
    }
    c = t == 0 ? v : _mm512_or_si512(c, _mm512_slli_epi16(v, s.shift));
  }
  return c;
}

// cbq[c] + 128 for 64 codes: one vpermb up to 6 bits, vpermi2b at 7, two and a blend at 8
template <int BITS>
inline __m512i lookup64(__m512i c, const __m512i* tab) {
  if (BITS <= 6) return _mm512_permutexvar_epi8(c, tab[0]);
  if (BITS == 7) return _mm512_permutex2var_epi8(tab[0], c, tab[1]);
  const __m512i lo = _mm512_permutex2var_epi8(tab[0], c, tab[1]);
  const __m512i hi = _mm512_permutex2var_epi8(tab[2], c, tab[3]);
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), lo, hi);
}

// the block scales of 8 lanes x 8 values of K from position j (B = 1 << shift, 32..): lane l
// holds scale[(j + 8 l) / B]; idx picks each lane's one of the (up to 4) scales loaded. A shift,
// not a division: a 64-bit idiv per 128 values was a tenth of the loop
template <typename ST>
inline __m512 lane_scales(const ST* scale, int64_t j, int shift, int64_t nb, __m512i idx) {
  const int64_t b = j >> shift;
  const int64_t n = std::min<int64_t>(4, nb - b);
  __m128 s4;
  if constexpr (std::is_same_v<ST, float>) {
    s4 = _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), scale + b);
  } else {
    s4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), scale + b));
  }
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s4));
}

// 4-bit W rows r < R times rows m0..m0+MT-1 of x (qx's pair layout): each whole 128 of K is one
// 64-byte load of codes whose low nibbles (even positions) and high nibbles (odd ones) look up
// cbq + 128 with vpshufb, two vpdpbusd per row into one int32 lane sum per 8 values of K; a last
// whole 64 the same at half width. The lanes' fp32 sums, then int8_tail for what is left.
template <int R, int MT, typename ST>
void pair4_tile(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
                const Int8Tables& t, int64_t K, int64_t B, const QuantX& qx, int64_t m0,
                float* out /* [R][MT] */) {
  const __m512i tab = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t.u8)));
  const __m512i low = _mm512_set1_epi8(0x0F);
  // lane l's scale: loaded scale (8 l) / B of the chunk's up to 4
  const __m512i idx = B >= 128 ? _mm512_setzero_si512()
                    : B == 64 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                              : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) prefetch_line(scale + (r + kScaleAheadRows) * nb);  // cpu_simd.h
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(B));
  const int64_t kx = qx.kx, full128 = K / 128 * 128, full64 = K / 64 * 64;
  for (int64_t j = 0; j < full128; j += 128) {
    __m512i lo[R], hi[R];
    __m512 ws[R];
    for (int r = 0; r < R; ++r) {
      prefetch_line(q + r * row_bytes + j / 2 + kCodesAheadBytes);
      const __m512i v = _mm512_loadu_si512(q + r * row_bytes + j / 2);
      lo[r] = _mm512_shuffle_epi8(tab, _mm512_and_si512(v, low));
      hi[r] = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
      ws[r] = lane_scales(scale + r * nb, j, shift, nb, idx);
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t o = (m0 + m) * kx + j;
      const __m512i xl = _mm512_loadu_si512(qx.qp.data() + o);
      const __m512i xh = _mm512_loadu_si512(qx.qp.data() + o + 64);
      const __m512i nc = _mm512_loadu_si512(qx.nc8.data() + o / 8);
      const __m512 dl = _mm512_loadu_ps(qx.dl8.data() + o / 8);
      for (int r = 0; r < R; ++r) {
        const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(nc, lo[r], xl), hi[r], xh);
        acc[r][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), ws[r]), dl, acc[r][m]);
      }
    }
  }
  if (full64 > full128) {  // one whole 64 left: the same at 256 bits, into lanes 0..7
    const int64_t j = full128;
    const __m256i tab8 = _mm512_castsi512_si256(tab), low8 = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + j / 2));
      const __m256i lo = _mm256_shuffle_epi8(tab8, _mm256_and_si256(v, low8));
      const __m256i hi = _mm256_shuffle_epi8(tab8, _mm256_and_si256(_mm256_srli_epi16(v, 4), low8));
      const __m256 ws = _mm512_castps512_ps256(lane_scales(scale + r * nb, j, shift, nb, idx));
      for (int m = 0; m < MT; ++m) {
        const int64_t o = (m0 + m) * kx + j;
        const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.qp.data() + o));
        const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.qp.data() + o + 32));
        const __m256i nc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.nc8.data() + o / 8));
        const __m256 dl = _mm256_loadu_ps(qx.dl8.data() + o / 8);
        const __m256i s = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(nc, lo, xl), hi, xh);
        const __m256 p = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), ws), dl);
        acc[r][m] = _mm512_add_ps(acc[r][m], _mm512_zextps256_ps512(p));
      }
    }
  }
  pair4_finish<R, MT>(acc, [](__m512 a) { return vsum16(a); }, q, row_bytes, scale, nb, t, K, B, qx,
                      m0, full64, out);
}

// rows r < R of W times rows m0..m0+MT-1 of x (R x MT accumulators, each summed alone)
template <int BITS, int R, int MT, typename ST, bool LIN = false>
void int8_tile(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
               const Int8Tables& t, int64_t K, int64_t kp, int64_t B, const QuantX& qx,
               int64_t m0, float* out /* [R][MT] */) {
  if constexpr (BITS == 4) {
    pair4_tile<R, MT>(q, row_bytes, scale, nb, t, K, B, qx, m0, out);
    return;
  }
  __m512i tab[4];
  for (int i = 0; i < 4; ++i) tab[i] = _mm512_load_si512(t.u8 + 64 * i);
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) prefetch_line(scale + (r + kScaleAheadRows) * nb);  // cpu_simd.h
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(B));
  const int64_t full = K / 64 * 64, step = B < 64 ? 64 : B, kx = qx.kx;
  for (int64_t b0 = 0; b0 < full; b0 += step) {
    __m512 ws[R];
    const int64_t b = b0 >> shift;
    for (int r = 0; r < R; ++r)
      ws[r] = B < 64 ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(to_float(scale[r * nb + b])),
                                            _mm512_set1_ps(to_float(scale[r * nb + b + 1])))
                     : _mm512_set1_ps(to_float(scale[r * nb + b]));
    const int64_t end = b0 + step < full ? b0 + step : full;
    for (int64_t j = b0; j < end; j += 64) {
      __m512i w[R];
      for (int r = 0; r < R; ++r) w[r] = lookup64<BITS>(codes64<BITS>(q + r * row_bytes, kp, j), tab);
      for (int m = 0; m < MT; ++m) {
        const int64_t o = (m0 + m) * kx;
        const __m512i xq = _mm512_loadu_si512(qx.q.data() + o + j);
        const __m512i nc = _mm512_loadu_si512(qx.nc.data() + (o + j) / 4);
        const __m512 dl = _mm512_loadu_ps(qx.dl.data() + (o + j) / 4);
        for (int r = 0; r < R; ++r) {
          const __m512 s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, w[r], xq));
          acc[r][m] = _mm512_fmadd_ps(s, _mm512_mul_ps(dl, ws[r]), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const int64_t o = (m0 + m) * kx;
      out[r * MT + m] = vsum16(acc[r][m]) +
          int8_tail<BITS>(q + r * row_bytes, scale + r * nb, t, K, kp, B, qx.q.data() + o,
                          qx.d.data() + o / kGroup, full);
    }
}
#elif KBIT_INT8 == 256
// the 32 codes j..j+31 (j % 32 == 0) as bytes, in order. codes32 and lookup32 are always_inline:
// once the prefill GEMM's panel decode used them too, gcc stopped inlining codes32 into the
// 8-bit head's rows (a call per 32 codes)
template <int BITS>
__attribute__((always_inline)) inline __m256i codes32(const uint8_t* row, int64_t kp, int64_t j) {
  __m256i c = _mm256_setzero_si256();
  for (int t = 0; t < Layout<BITS>::n; ++t) {
    const Slice s = Layout<BITS>::s[t];
    const uint8_t* src = row + s.offset * (kp / 8) + j * s.width / 8;
    __m256i v;
    if (s.width == 8) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    } else if (s.width == 4) {
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      v = _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi16(w, 4)), _mm256_set1_epi8(0x0F));
    } else if (s.width == 2) {
      const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
      v = _mm256_or_si256(_mm256_or_si256(w, _mm256_slli_epi32(w, 6)),
                          _mm256_or_si256(_mm256_slli_epi32(w, 12), _mm256_slli_epi32(w, 18)));
      v = _mm256_and_si256(v, _mm256_set1_epi8(0x03));
    } else {  // byte i: bit i % 8 of byte i / 8 of the 32 bits
      uint32_t b;
      std::memcpy(&b, src, 4);
      const __m256i rep = _mm256_shuffle_epi8(
          _mm256_set1_epi32(static_cast<int>(b)),
          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                           3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
      v = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit), _mm256_set1_epi8(1));
    }
    c = t == 0 ? v : _mm256_or_si256(c, _mm256_slli_epi16(v, s.shift));
  }
  return c;
}

// cbq[c] for 32 codes: vpshufb on the low 4 bits, one table per value of the bits above
template <int BITS>
__attribute__((always_inline)) inline __m256i lookup32(__m256i c, const __m256i* tab) {
  if (BITS <= 4) return _mm256_shuffle_epi8(tab[0], c);
  const __m256i lo = _mm256_and_si256(c, _mm256_set1_epi8(0x0F));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), _mm256_set1_epi8(0x0F));
  __m256i r = _mm256_shuffle_epi8(tab[0], lo);
  for (int h = 1; h < (1 << (BITS - 4)); ++h)
    r = _mm256_blendv_epi8(r, _mm256_shuffle_epi8(tab[h], lo),
                           _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(static_cast<char>(h))));
  return r;
}

// 4-bit W rows r < R times rows m0..m0+MT-1 of x in qx's pair layout (per 64: the even
// positions, then the odd ones), blocks of 64k values: one 32-byte load of codes gives 64 of
// them, the low nibbles (even) and high nibbles (odd) each one vpshufb of cbq, and the two
// maddubs sums add into one int32 lane per 8 values of K (their group's scale in dl8): about
// two thirds of codes32's instructions per value. int8_tail for what is left of K.
template <int R, int MT, typename ST>
__attribute__((always_inline)) inline void pair4_tile(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
                const Int8Tables& t, int64_t K, int64_t B, const QuantX& qx, int64_t m0,
                float* out /* [R][MT] */) {
  const __m256i tab = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t.s8)));
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) prefetch_line(scale + (r + kScaleAheadRows) * nb);  // cpu_simd.h
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(B));
  const int64_t kx = qx.kx, full64 = K / 64 * 64;
  for (int64_t j = 0; j < full64; j += 64) {
    __m256i we[R], wo[R], ae[R], ao[R];
    float ws[R];
    for (int r = 0; r < R; ++r) {
      if ((j & 127) == 0) prefetch_line(q + r * row_bytes + j / 2 + kCodesAheadBytes);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + j / 2));
      we[r] = _mm256_shuffle_epi8(tab, _mm256_and_si256(v, low));
      wo[r] = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
      ae[r] = _mm256_abs_epi8(we[r]);
      ao[r] = _mm256_abs_epi8(wo[r]);
      ws[r] = to_float(scale[r * nb + (j >> shift)]);
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t o = (m0 + m) * kx + j;
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.qp.data() + o));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.qp.data() + o + 32));
      const __m256 dl = _mm256_loadu_ps(qx.dl8.data() + o / 8);
      for (int r = 0; r < R; ++r) {
        const __m256i s = _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(ae[r], _mm256_sign_epi8(xe, we[r])), ones),
            _mm256_madd_epi16(_mm256_maddubs_epi16(ao[r], _mm256_sign_epi8(xo, wo[r])), ones));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dl, _mm256_set1_ps(ws[r])),
                                    acc[r][m]);
      }
    }
  }
  pair4_finish<R, MT>(acc, [](__m256 a) { return sum8(a); }, q, row_bytes, scale, nb, t, K, B, qx,
                      m0, full64, out);
}

template <int BITS, int R, int MT, typename ST, bool LIN = false>
void int8_tile(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
               const Int8Tables& t, int64_t K, int64_t kp, int64_t B, const QuantX& qx,
               int64_t m0, float* out /* [R][MT] */) {
  if constexpr (BITS == 4 && !LIN) {
    if (B % 64 == 0) {  // qx holds the pair layout (kbit_linear_int8)
      pair4_tile<R, MT>(q, row_bytes, scale, nb, t, K, B, qx, m0, out);
      return;
    }
  }
  __m256i tab[16];
  for (int i = 0; i < 16 && i < (1 << BITS) / 16 + (BITS < 4); ++i)
    tab[i] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t.s8 + 16 * i)));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t full = K / 32 * 32, kx = qx.kx;
  // block by block: the scale loaded once per block, its index counted (`j / B` was a 64-bit
  // division per 32 codes: it made the 8-bit rows 3x slower than their bytes allow)
  for (int r = 0; r < R; ++r) prefetch_line(scale + (r + kScaleAheadRows) * nb);
  int64_t b = 0;
  for (int64_t b0 = 0; b0 < full; b0 += B, ++b) {
    float ws[R];
    for (int r = 0; r < R; ++r) ws[r] = to_float(scale[r * nb + b]);
    const int64_t end = b0 + B < full ? b0 + B : full;
    for (int64_t j = b0; j < end; j += 32) {
      __m256i w[R], aw[R];
      for (int r = 0; r < R; ++r) {
        if ((j & 63) == 0) prefetch_line(q + r * row_bytes + j * BITS / 8 + kCodesAheadBytes);
        const __m256i c = codes32<BITS>(q + r * row_bytes, kp, j);
        w[r] = LIN ? _mm256_sub_epi8(c, _mm256_set1_epi8(127)) : lookup32<BITS>(c, tab);
        aw[r] = _mm256_abs_epi8(w[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const int64_t o = (m0 + m) * kx;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.q.data() + o + j));
        const float d = qx.d[(o + j) / kGroup];
        for (int r = 0; r < R; ++r) {
          const __m256i p = _mm256_madd_epi16(
              _mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xq, w[r])), ones);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ws[r]), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const int64_t o = (m0 + m) * kx;
      out[r * MT + m] = sum8(acc[r][m]) +
          int8_tail<BITS>(q + r * row_bytes, scale + r * nb, t, K, kp, B, qx.q.data() + o,
                          qx.d.data() + o / kGroup, full);
    }
}
#else
template <int BITS, int R, int MT, typename ST, bool LIN = false>
void int8_tile(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
               const Int8Tables& t, int64_t K, int64_t kp, int64_t B, const QuantX& qx,
               int64_t m0, float* out /* [R][MT] */) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const int64_t o = (m0 + m) * qx.kx;
      out[r * MT + m] = int8_tail<BITS>(q + r * row_bytes, scale + r * nb, t, K, kp, B,
                                        qx.q.data() + o, qx.d.data() + o / kGroup, 0);
    }
}
#endif

// rows [n0, n1) of y (M, N): one row of W at a time (kRows in cpu_kernels.cpp says why), rows of
// x 4 at a time
// one row of W times tokens m0..m0+MT-1: on AVX2, 4-bit rows in pair order inline (pair4_tile is
// always_inline: otherwise a call per row of only 9 steps at K = 576), else int8_tile
template <int BITS, int MT, typename ST, bool LIN>
__attribute__((always_inline)) inline void row_tile(const uint8_t* q, int64_t row_bytes,
                                                    const ST* scale, int64_t nb,
                                                    const Int8Tables& t, int64_t K, int64_t kp,
                                                    int64_t B, const QuantX& qx, int64_t m0,
                                                    float* out) {
#if KBIT_INT8 == 256
  if constexpr (BITS == 4 && !LIN)
    if (B % 64 == 0) return pair4_tile<1, MT>(q, row_bytes, scale, nb, t, K, B, qx, m0, out);
#endif
  int8_tile<BITS, 1, MT, ST, LIN>(q, row_bytes, scale, nb, t, K, kp, B, qx, m0, out);
}

#ifndef KBIT_PAIR_ROWS
#define KBIT_PAIR_ROWS 2
#endif
constexpr int kPairRows = KBIT_PAIR_ROWS;

template <int BITS, typename ST, bool LIN = false>
void int8_rows(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
               const Int8Tables& t, int64_t K, int64_t kp, int64_t B, const QuantX& qx,
               int64_t M, int64_t N, const float* bias, float* y, int64_t n0, int64_t n1) {
  auto put = [&](int64_t n, int64_t m, float v) { y[m * N + n] = bias ? v + bias[n] : v; };
  float v[4];
  int64_t n = n0;
#if KBIT_INT8 == 256
  // a decoding step's AVX2 4-bit rows in pairs: the x loads and their scales shared, two
  // independent sums in flight (each row keeps its own accumulator: the same sums)
  if constexpr (BITS == 4 && !LIN)
    if (B % 64 == 0 && M < 4)
      for (; n + kPairRows <= n1; n += kPairRows)
        for (int64_t m = 0; m < M; ++m) {
          float o[kPairRows];
          pair4_tile<kPairRows, 1>(q + n * row_bytes, row_bytes, scale + n * nb, nb, t, K, B, qx,
                                   m, o);
          for (int r = 0; r < kPairRows; ++r) put(n + r, m, o[r]);
        }
#endif
  for (; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const ST* sn = scale + n * nb;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      row_tile<BITS, 4, ST, LIN>(qn, row_bytes, sn, nb, t, K, kp, B, qx, m, v);
      for (int i = 0; i < 4; ++i) put(n, m + i, v[i]);
    }
    for (; m < M; ++m) {
      row_tile<BITS, 1, ST, LIN>(qn, row_bytes, sn, nb, t, K, kp, B, qx, m, v);
      put(n, m, v[0]);
    }
  }
}

// x (M, K) quantized as the rows below read it for W of `bits` in blocks of `block`
void quantize_for(const float* x, int64_t M, int64_t K, int64_t bits, int64_t block, float cfac,
                  QuantX& qx) {
  quantize_x(x, M, K, cfac, qx);
#if KBIT_INT8 == 512
  if (bits == 4) pair_layout(M, K, qx);
#elif KBIT_INT8 == 256
  if (bits == 4 && block % 64 == 0) pair_layout(M, K, qx, 64);
#endif
  (void)bits, (void)block;
}

// rows n0..n1 of y (M, N) = x W^T (+ bias) from x quantized by quantize_for
void int8_rows_of(const at::Tensor& qweight, const at::Tensor& absmax, const Int8Tables& t,
                  int64_t bits, int64_t block, int64_t K, const QuantX& qx, int64_t M,
                  const float* bias, float* y, int64_t n0, int64_t n1) {
  const int64_t N = qweight.size(0), kp = (K + 7) / 8 * 8, nb = absmax.size(1);
  const int64_t row_bytes = qweight.size(1);
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  with_bits_and_scale(bits, absmax, [&](auto tag, const auto* scale) {
    constexpr int BITS = decltype(tag)::value;
    using ST = std::remove_cv_t<std::remove_pointer_t<decltype(scale)>>;
    if (BITS == 8 && t.linear8)
      int8_rows<BITS, ST, true>(q, row_bytes, scale, nb, t, K, kp, block, qx, M, N, bias, y, n0, n1);
    else
      int8_rows<BITS, ST>(q, row_bytes, scale, nb, t, K, kp, block, qx, M, N, bias, y, n0, n1);
  });
}

// the int8 paths' argument checks (x, W, blocks of 32k values), then the codebook's int8 tables
Int8Tables checked_int8_tables(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& absmax, const at::Tensor& codebook, int64_t bits,
                               int64_t block_size, int64_t K) {
  check_x(x, K);
  TORCH_CHECK(block_size % kGroup == 0, "kbitrt_cpu: the int8 path needs blocks of 32k values");
  with_decoder(qweight, absmax, codebook, bits, block_size, K,
               [&](auto decode, auto, auto, bool) { (void)decode; });  // checks the arguments
  Int8Tables t;
  const auto cbc = codebook.contiguous();
  int8_tables(cbc.data_ptr<float>(), static_cast<int>(bits), t);
  return t;
}

// y = x W^T through the int8 path (block_size a multiple of 32: every power of two the format
// allows)
at::Tensor kbit_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                            const at::Tensor& codebook, const c10::optional<at::Tensor>& bias,
                            int64_t bits, int64_t block_size, int64_t in_features) {
  const int64_t M = x.size(0), N = qweight.size(0), K = in_features;
  const Int8Tables t = checked_int8_tables(x, qweight, absmax, codebook, bits, block_size, K);
  auto y = at::empty({M, N}, x.options());
  const float* b = bias_ptr(bias, N);
  // reused by each thread's calls: a step's ~120 linears would otherwise allocate 4-7 buffers each
  // (a thread_local is not captured: the workers must see this thread's through a reference)
  static thread_local QuantX mine;
  QuantX& qx = mine;
  quantize_for(x.data_ptr<float>(), M, K, bits, block_size, t.cfac, qx);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int8_rows_of(qweight, absmax, t, bits, block_size, K, qx, M, b, yp, n0, n1);
  });
  return y;
}

// which path kbit_linear takes (kernels/cpu.py set_activations): 0 fp32, 1 int8 activations,
// 2 auto: int8, except 4-bit weights under the portable loops (no faster there than the fp32
// pair-ordered lookups, which are exact). On AVX2 (an AMD EPYC without AVX-512) the int8 rows
// beat the fp32 path at 4 bits in decode (1.5x) and prefill (1.4x): docs/cpu.md, "AVX2".
std::atomic<int> g_int8_activations{0};

void set_int8_activations(int64_t mode) { g_int8_activations.store(static_cast<int>(mode)); }

bool int8_for(int64_t bits) {
  const int mode = g_int8_activations.load(std::memory_order_relaxed);
#ifdef KBIT_INT8
  constexpr bool kAutoAtFour = true;
#else
  constexpr bool kAutoAtFour = false;
#endif
  return mode == 1 || (mode == 2 && (bits != 4 || kAutoAtFour));
}

// 512 (AVX-512 VBMI + VNNI), 256 (AVX2) or 0 (portable loops): what runs the int8 path here
int64_t int8_width() {
#ifdef KBIT_INT8
  return KBIT_INT8;
#else
  return 0;
#endif
}
