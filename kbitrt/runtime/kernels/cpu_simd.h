// The vector layer of cpu_kernels.cpp: 16 fp32 / int32 lanes as one AVX-512 register (vf, vi)
// or two AVX2 ones, with the dozen operations the kernels use, so both share every loop.
// Included inside the kernels' anonymous namespace, after <immintrin.h> and KBIT_SIMD.
// KBIT_SIMD == 128: four NEON registers (aarch64, after <arm_neon.h>), with the same sums lane for
// lane; tests/neon_parity.cpp checks it against the portable loops under qemu-aarch64.
#pragma once

// Software prefetch for the decode kernels, one row of W at a time: the codes kCodesAheadBytes on
// (the next rows follow this one's) and the scales kScaleAheadRows rows on, a line per row, too
// slow a stream for the hardware prefetcher to run ahead of. On Zen 4 the scale loads stalled a
// third of the 4-bit int8 loop; with both, TinyLlama's 22 layers' linears went 17.6 -> 12.6 ms.
// A prefetch never faults, so running past the end of a tensor is harmless.
constexpr int64_t kCodesAheadBytes = 2048, kScaleAheadRows = 8;
inline void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 3); }

#if KBIT_SIMD == 512 || KBIT_SIMD == 256
// lanes 0..7 of h summed by the tree h[l] += h[l + w], w = 4, 2, 1
inline float sum8(__m256 h) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}
#endif

#if KBIT_SIMD == 512
// 16 fp32 / int32 lanes
using vf = __m512;
using vi = __m512i;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float s) { return _mm512_set1_ps(s); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vi widen(__m128i bytes) { return _mm512_cvtepu8_epi32(bytes); }  // 16 bytes -> 16 lanes
inline vi vand(vi a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
inline vi vor(vi a, vi b) { return _mm512_or_si512(a, b); }
inline vi vsrl(vi a, int n) { return _mm512_srli_epi32(a, n); }
inline vi vsll(vi a, int n) { return _mm512_slli_epi32(a, n); }
inline vi vsrlv(vi a, const int32_t* n) { return _mm512_srlv_epi32(a, _mm512_loadu_si512(n)); }
inline vf lut16(vi c, vf table) { return _mm512_permutexvar_ps(c, table); }  // table[c], c < 16
inline vf vgather(vi c, const float* cb) { return _mm512_i32gather_ps(c, cb, 4); }
inline vf load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf load16(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
// the 16 lanes summed by the tree v[l] += v[l + w], w = 8, 4, 2, 1 (the order every dot keeps)
inline float vsum16(vf v) {
  return sum8(_mm256_add_ps(_mm512_castps512_ps256(v),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#elif KBIT_SIMD == 256
// 16 lanes as two AVX2 registers: lanes 0..7 in a, 8..15 in b
struct vf {
  __m256 a, b;
};
struct vi {
  __m256i a, b;
};
inline vf vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, vf v) {
  _mm256_storeu_ps(p, v.a);
  _mm256_storeu_ps(p + 8, v.b);
}
inline vf vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf vset(float s) { return {_mm256_set1_ps(s), _mm256_set1_ps(s)}; }
inline vf vmul(vf x, vf y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline vf vadd(vf x, vf y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
inline vf vfma(vf x, vf y, vf z) {
  return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
}
inline vi widen(__m128i bytes) {
  return {_mm256_cvtepu8_epi32(bytes), _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))};
}
inline vi vand(vi x, int m) {
  const __m256i mv = _mm256_set1_epi32(m);
  return {_mm256_and_si256(x.a, mv), _mm256_and_si256(x.b, mv)};
}
inline vi vor(vi x, vi y) { return {_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b)}; }
inline vi vsrl(vi x, int n) { return {_mm256_srli_epi32(x.a, n), _mm256_srli_epi32(x.b, n)}; }
inline vi vsll(vi x, int n) { return {_mm256_slli_epi32(x.a, n), _mm256_slli_epi32(x.b, n)}; }
inline vi vsrlv(vi x, const int32_t* n) {
  return {_mm256_srlv_epi32(x.a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(n))),
          _mm256_srlv_epi32(x.b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(n + 8)))};
}
inline __m256 lut16_half(__m256i c, vf table) {  // two 8-entry permutes, bit 3 picks one
  const __m256 lo = _mm256_permutevar8x32_ps(table.a, c);
  const __m256 hi = _mm256_permutevar8x32_ps(table.b, c);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}
inline vf lut16(vi c, vf table) { return {lut16_half(c.a, table), lut16_half(c.b, table)}; }
inline vf vgather(vi c, const float* cb) {
  return {_mm256_i32gather_ps(cb, c.a, 4), _mm256_i32gather_ps(cb, c.b, 4)};
}
inline vf load16(const at::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline vf load16(const at::BFloat16* p) {
  auto half = [](const at::BFloat16* q) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  };
  return {half(p), half(p + 8)};
}
inline float vsum16(vf v) { return sum8(_mm256_add_ps(v.a, v.b)); }  // as the AVX-512 one
#elif KBIT_SIMD == 128
// 16 lanes as four NEON registers: lanes 4q..4q+3 in v[q]
struct vf {
  float32x4_t v[4];
};
struct vi {
  uint32x4_t v[4];
};
template <typename F>
inline vf vmap(F f) { return {{f(0), f(1), f(2), f(3)}}; }
template <typename F>
inline vi imap(F f) { return {{f(0), f(1), f(2), f(3)}}; }
inline vf vload(const float* p) { return vmap([p](int q) { return vld1q_f32(p + 4 * q); }); }
inline void vstore(float* p, vf v) {
  for (int q = 0; q < 4; ++q) vst1q_f32(p + 4 * q, v.v[q]);
}
inline vf vzero() { return vmap([](int) { return vdupq_n_f32(0.f); }); }
inline vf vset(float s) { return vmap([s](int) { return vdupq_n_f32(s); }); }
inline vf vmul(vf a, vf b) { return vmap([&](int q) { return vmulq_f32(a.v[q], b.v[q]); }); }
inline vf vadd(vf a, vf b) { return vmap([&](int q) { return vaddq_f32(a.v[q], b.v[q]); }); }
inline vf vfma(vf a, vf b, vf c) {  // a * b + c, one rounding (as _mm512_fmadd_ps and std::fma)
  return vmap([&](int q) { return vfmaq_f32(c.v[q], a.v[q], b.v[q]); });
}
inline vi widen(uint8x16_t bytes) {  // 16 bytes -> 16 lanes
  const uint16x8_t lo = vmovl_u8(vget_low_u8(bytes)), hi = vmovl_u8(vget_high_u8(bytes));
  return {{vmovl_u16(vget_low_u16(lo)), vmovl_u16(vget_high_u16(lo)), vmovl_u16(vget_low_u16(hi)),
           vmovl_u16(vget_high_u16(hi))}};
}
inline vi vand(vi a, int m) { return imap([&](int q) { return vandq_u32(a.v[q], vdupq_n_u32(m)); }); }
inline vi vor(vi a, vi b) { return imap([&](int q) { return vorrq_u32(a.v[q], b.v[q]); }); }
inline vi vsrl(vi a, int n) { return imap([&](int q) { return vshlq_u32(a.v[q], vdupq_n_s32(-n)); }); }
inline vi vsll(vi a, int n) { return imap([&](int q) { return vshlq_u32(a.v[q], vdupq_n_s32(n)); }); }
inline vi vsrlv(vi a, const int32_t* n) {
  return imap([&](int q) { return vshlq_u32(a.v[q], vnegq_s32(vld1q_s32(n + 4 * q))); });
}
inline vf lut16(vi c, vf table) {  // table[c], c < 16: a byte lookup of each lane's 4 bytes
  const uint8x16x4_t t = {{vreinterpretq_u8_f32(table.v[0]), vreinterpretq_u8_f32(table.v[1]),
                           vreinterpretq_u8_f32(table.v[2]), vreinterpretq_u8_f32(table.v[3])}};
  return vmap([&](int q) {
    const uint32x4_t idx = vmlaq_n_u32(vdupq_n_u32(0x03020100u), c.v[q], 0x04040404u);
    return vreinterpretq_f32_u8(vqtbl4q_u8(t, vreinterpretq_u8_u32(idx)));
  });
}
inline vf vgather(vi c, const float* cb) {
  return vmap([&](int q) {
    const float g[4] = {cb[vgetq_lane_u32(c.v[q], 0)], cb[vgetq_lane_u32(c.v[q], 1)],
                        cb[vgetq_lane_u32(c.v[q], 2)], cb[vgetq_lane_u32(c.v[q], 3)]};
    return vld1q_f32(g);
  });
}
inline vf load16(const at::Half* p) {
  const auto* h = reinterpret_cast<const float16_t*>(p);
  return vmap([h](int q) { return vcvt_f32_f16(vld1_f16(h + 4 * q)); });
}
inline vf load16(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const auto* h = reinterpret_cast<const uint16_t*>(p);
  return vmap([h](int q) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h + 4 * q), 16)); });
}
// the 16 lanes summed by the tree v[l] += v[l + w], w = 8, 4, 2, 1 (the x86 paths' order)
inline float vsum16(vf v) {
  const float32x4_t q = vaddq_f32(vaddq_f32(v.v[0], v.v[2]), vaddq_f32(v.v[1], v.v[3]));
  const float32x2_t p = vadd_f32(vget_low_f32(q), vget_high_f32(q));
  return vget_lane_f32(p, 0) + vget_lane_f32(p, 1);
}
// the 16 codes of one bitslice slice of width W (8, 4, 2 or 1 bits) from src: lane i is
// src[i * W / 8] >> (i % (8 / W)) * W, masked (the step codes16 takes per slice on x86)
template <int W>
inline vi slice16(const uint8_t* src) {
  if (W == 8) return widen(vld1q_u8(src));
  if (W == 4) {  // byte b holds codes 2b (low nibble) and 2b+1
    const uint8x8_t x = vld1_u8(src), lo = vand_u8(x, vdup_n_u8(0x0F)), hi = vshr_n_u8(x, 4);
    return widen(vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi)));
  }
  // widths 2 and 1: each byte repeated 8 / W times, shifted right by its lane's offset
  alignas(16) static constexpr uint8_t rep2[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
  alignas(16) static constexpr int8_t shift2[16] = {0, -2, -4, -6, 0, -2, -4, -6,
                                                    0, -2, -4, -6, 0, -2, -4, -6};
  alignas(16) static constexpr uint8_t rep1[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
  alignas(16) static constexpr int8_t shift1[16] = {0, -1, -2, -3, -4, -5, -6, -7,
                                                    0, -1, -2, -3, -4, -5, -6, -7};
  uint8_t b[16] = {0};
  std::memcpy(b, src, W * 2);  // 16 codes of W bits
  const uint8x16_t bytes = vqtbl1q_u8(vld1q_u8(b), vld1q_u8(W == 2 ? rep2 : rep1));
  const uint8x16_t shifted = vshlq_u8(bytes, vld1q_s8(W == 2 ? shift2 : shift1));
  return widen(vandq_u8(shifted, vdupq_n_u8((1 << W) - 1)));
}
#endif
