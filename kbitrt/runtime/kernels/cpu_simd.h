// The vector layer of cpu_kernels.cpp: 16 fp32 / int32 lanes as one AVX-512 register (vf, vi)
// or two AVX2 ones, with the dozen operations the kernels use, so both share every loop.
// Included inside the kernels' anonymous namespace, after <immintrin.h> and KBIT_SIMD.
#pragma once

// lanes 0..7 of h summed by the tree h[l] += h[l + w], w = 4, 2, 1
inline float sum8(__m256 h) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}

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
#endif
