// 4-bit rows in "pair order", the common case of cpu_kernels.cpp (docs/cpu.md). Included inside
// the kernels' anonymous namespace, in their vector section (after lanes_sum and dot).
#pragma once

// 4 bits: W and x in "pair order". One packed byte holds an even and an odd code, so each whole
// 32 of K is taken as its 16 even positions, then its 16 odd ones (one widening load of 16 bytes,
// a mask and a shift give both, half the shuffles of codes16); the rest of K stays in order.
// x is permuted once per call (to_pair_order); decode_pair4 + dot and rows_dot_pair4 then add the
// same products in the same order.
inline void to_pair_order(const float* x, int64_t K, float* out) {
  const int64_t k32 = K / 32 * 32;
  for (int64_t j = 0; j < k32; j += 32)
    for (int l = 0; l < 16; ++l) {
      out[j + l] = x[j + 2 * l];
      out[j + 16 + l] = x[j + 2 * l + 1];
    }
  for (int64_t j = k32; j < K; ++j) out[j] = x[j];
}

inline void pair32(const uint8_t* row, int64_t j, vf table, vf& even, vf& odd) {
  const vi v = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j / 2)));
  even = lut16(vand(v, 15), table);
  odd = lut16(vsrl(v, 4), table);
}

// positions [from, K) of a 4-bit row (from % 32 == 0, B % 32 == 0) in pair order, at out[0..]
template <typename ST>
void decode_pair4(const uint8_t* row, const ST* scale, const float* cb, int64_t kp, int64_t B,
                  int64_t from, int64_t K, float* out) {
  const int64_t k32 = K / 32 * 32;
  const vf cbv = vload(cb);
  for (int64_t j = from; j < k32; j += 32) {
    vf even, odd;
    pair32(row, j, vmul(cbv, vset(to_float(scale[j / B]))), even, odd);
    vstore(out + j - from, even);
    vstore(out + j - from + 16, odd);
  }
  for (int64_t i = from > k32 ? from : k32; i < K; ++i)
    out[i - from] = cb[code_at<4>(row, kp, i)] * to_float(scale[i / B]);
}

// rows r < R of a 4-bit W (row_bytes and nb scales apart) times x in pair order, blocks of whole
// 64s: dot(x, decode_pair4(row)) for each
template <int R, typename ST>
void rows_dot_pair4(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
                    const float* cb, int64_t K, int64_t kp, int64_t B, const float* x,
                    float* out) {
  vf acc[R][4];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = vzero();
  const int64_t whole = K / 64 * 64, k16 = K / 16 * 16;
  const vf cbv = vload(cb);
  // rows a few ahead: their scales (one line per row, too slow a stream for the hardware
  // prefetcher) and the codes a few lines on; block indices counted, not divided
  for (int r = 0; r < R; ++r) prefetch_line(scale + (r + kScaleAheadRows) * nb);
  int64_t b = 0;
  for (int64_t b0 = 0; b0 < whole; b0 += B, ++b) {
    vf table[R];
    for (int r = 0; r < R; ++r) table[r] = vmul(cbv, vset(to_float(scale[r * nb + b])));
    const int64_t end = b0 + B < whole ? b0 + B : whole;
    for (int64_t j = b0; j < end; j += 64) {
      for (int r = 0; r < R; ++r) prefetch_line(q + r * row_bytes + j / 2 + kCodesAheadBytes);
      const vf x0 = vload(x + j), x1 = vload(x + j + 16), x2 = vload(x + j + 32),
               x3 = vload(x + j + 48);
      for (int r = 0; r < R; ++r) {
        vf e0, o0, e1, o1;
        pair32(q + r * row_bytes, j, table[r], e0, o0);
        pair32(q + r * row_bytes, j + 32, table[r], e1, o1);
        acc[r][0] = vfma(x0, e0, acc[r][0]);
        acc[r][1] = vfma(x1, o0, acc[r][1]);
        acc[r][2] = vfma(x2, e1, acc[r][2]);
        acc[r][3] = vfma(x3, o1, acc[r][3]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float tail = 0.f;
    if (whole < K) {  // under 64 values: decoded, then summed as dot() sums them
      float w[64];
      decode_pair4(q + r * row_bytes, scale + r * nb, cb, kp, B, whole, K, w);
      int64_t i = whole;
      for (; i < k16; i += 16) acc[r][0] = vfma(vload(x + i), vload(w + i - whole), acc[r][0]);
      for (; i < K; ++i) tail = std::fma(x[i], w[i - whole], tail);
    }
    out[r] = lanes_sum(acc[r][0], acc[r][1], acc[r][2], acc[r][3]) + tail;
  }
}
