// Fused k-bit CPU kernels (docs/cpu.md): y = x W^T with W read from the packed bitslice-v1 codes,
// its block scales and codebook, never held dense. Built on first use by kernels/cpu.py with
// -march=native, so the vector paths are AVX-512 or AVX2 (+FMA, F16C) as the CPU has them, and
// portable loops elsewhere. Both vector paths work on groups of 16 lanes (one AVX-512 register,
// two AVX2 ones) through the few v* functions below, so they share every loop.
//
// Each worker takes a range of output rows; a row is decoded once into an fp32 buffer
// (codebook[code] * scale, the twin's exact product) and dotted with every row of x in one fixed
// order, so y[m, n] does not depend on M: one token and a batch of tokens get identical logits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KBIT_SIMD 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KBIT_SIMD 256
#endif

namespace {

// bitslice-v1 (kbitrt/format/packing.py): slices of 4/2/1 bits, lowest code bits in the widest;
// a slice of width w starts at byte offset*Kp/8 of the row and holds 8/w codes per byte
struct Slice {
  int width, shift, offset;
};

template <int BITS>
struct Layout;
template <> struct Layout<3> { static constexpr int n = 2; static constexpr Slice s[2] = {{2, 0, 0}, {1, 2, 2}}; };
template <> struct Layout<4> { static constexpr int n = 1; static constexpr Slice s[1] = {{4, 0, 0}}; };
template <> struct Layout<5> { static constexpr int n = 2; static constexpr Slice s[2] = {{4, 0, 0}, {1, 4, 4}}; };
template <> struct Layout<6> { static constexpr int n = 2; static constexpr Slice s[2] = {{4, 0, 0}, {2, 4, 4}}; };
template <> struct Layout<7> { static constexpr int n = 3; static constexpr Slice s[3] = {{4, 0, 0}, {2, 4, 4}, {1, 6, 6}}; };
template <> struct Layout<8> { static constexpr int n = 1; static constexpr Slice s[1] = {{8, 0, 0}}; };

template <int BITS>
inline int code_at(const uint8_t* row, int64_t kp, int64_t i) {
  int c = 0;
  for (int t = 0; t < Layout<BITS>::n; ++t) {
    const Slice s = Layout<BITS>::s[t];
    const int per = 8 / s.width;
    const uint8_t byte = row[s.offset * (kp / 8) + i / per];
    c |= ((byte >> ((i % per) * s.width)) & ((1 << s.width) - 1)) << s.shift;
  }
  return c;
}

inline float to_float(float v) { return v; }
#if defined(KBIT_SIMD) && defined(__F16C__)
// one instruction (c10::Half's conversion is a bit-twiddling routine): a block scale per 64 weights
inline float to_float(c10::Half v) { return _cvtsh_ss(v.x); }
#else
inline float to_float(c10::Half v) { return static_cast<float>(v); }
#endif

#ifdef KBIT_SIMD
#include "cpu_simd.h"
#endif

#ifdef KBIT_SIMD
alignas(64) constexpr int32_t kShift2[16] = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
alignas(64) constexpr int32_t kShift1[16] = {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};

// the 16 codes j..j+15 (j % 16 == 0) as int32 lanes
template <int BITS>
inline vi codes16(const uint8_t* row, int64_t kp, int64_t j) {
  vi c{};
  for (int t = 0; t < Layout<BITS>::n; ++t) {
    const Slice s = Layout<BITS>::s[t];
    const uint8_t* src = row + s.offset * (kp / 8) + j * s.width / 8;
    vi v;
    if (s.width == 8) {
      v = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    } else if (s.width == 4) {  // byte b holds codes 2b (low nibble) and 2b+1
      uint64_t b;
      std::memcpy(&b, src, 8);
      const __m128i x = _mm_cvtsi64_si128(static_cast<long long>(b));
      const __m128i m = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
      v = widen(_mm_unpacklo_epi8(lo, hi));
    } else if (s.width == 2) {  // lane i: byte i/4 >> 2(i%4)
      uint32_t b;
      std::memcpy(&b, src, 4);
      const __m128i rep = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
      v = vand(vsrlv(widen(_mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(b)), rep)),
                     kShift2), 3);
    } else {  // width 1: lane i: byte i/8 >> (i%8)
      uint16_t b;
      std::memcpy(&b, src, 2);
      const __m128i rep = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      v = vand(vsrlv(widen(_mm_shuffle_epi8(_mm_cvtsi32_si128(b), rep)), kShift1), 1);
    }
    c = t == 0 ? v : vor(c, vsll(v, s.shift));
  }
  return c;
}

// register tables: a 16-entry one everywhere; with AVX-512 also 32 and 64 entries
constexpr int table_bits(int bits) { return KBIT_SIMD == 512 ? (bits <= 6 ? bits : 0) : (bits <= 4 ? bits : 0); }

// codebook[c] * scale for 16 codes: from the register table (codebook * scale, one product per
// entry as the twin's) where there is one, else a gather and the same product
template <int BITS>
inline vf lookup16(vi c, const vf* table, const float* cb, vf scale) {
  if (BITS <= 4) return lut16(c, table[0]);
#if KBIT_SIMD == 512
  if (BITS == 5) return _mm512_permutex2var_ps(table[0], c, table[1]);
  if (BITS == 6) {
    const __m512 lo = _mm512_permutex2var_ps(table[0], c, table[1]);
    const __m512 hi = _mm512_permutex2var_ps(table[2], c, table[3]);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(c, _mm512_set1_epi32(32)), lo, hi);
  }
#endif
  return vmul(vgather(c, cb), scale);
}

// the register tables of one block (scale s)
template <int BITS>
inline void make_tables(const float* cb, vf s, vf* table) {
  if (table_bits(BITS))
    for (int t = 0; t < (1 << BITS) / 16 || t == 0; ++t) table[t] = vmul(vload(cb + 16 * t), s);
}
#endif

// one row of W (K values) into out: codebook[code] * scale of its block
template <int BITS, typename ST>
void decode_row(const uint8_t* row, const ST* scale, const float* cb, int64_t K, int64_t kp,
                int64_t B, float* out) {
  int64_t i = 0;
#ifdef KBIT_SIMD
  if (B % 16 == 0) {
    const int64_t full = K / 16 * 16;
    vf table[4];
    for (int64_t b0 = 0; b0 < full; b0 += B) {
      const vf sv = vset(to_float(scale[b0 / B]));
      make_tables<BITS>(cb, sv, table);
      const int64_t end = b0 + B < full ? b0 + B : full;
      for (int64_t j = b0; j < end; j += 16)
        vstore(out + j, lookup16<BITS>(codes16<BITS>(row, kp, j), table, cb, sv));
    }
    i = full;
  }
#endif
  for (; i < K; ++i) out[i] = cb[code_at<BITS>(row, kp, i)] * to_float(scale[i / B]);
}

// a . b in one fixed order: 64 lanes (4 x 16) over whole 64s, lanes 0..15 over the remaining
// 16s, a fixed tree over the lanes, then the scalar tail. Every path below sums in this order.
#ifdef KBIT_SIMD
inline float lanes_sum(vf a0, vf a1, vf a2, vf a3) {
  return vsum16(vadd(vadd(a0, a2), vadd(a1, a3)));
}

// rows of W taken together in a decoding step (M = 1): one. Rows of 1-4 KB read side by side are
// short interleaved streams that the hardware prefetcher follows worse than one long stream (on
// Zen 4, 2 threads: 44 GB/s one row at a time, 33 GB/s four), and one row's four accumulator
// chains already hide the FMA latency. Each row keeps its own accumulators: the same sums either way
constexpr int kRows = 1;

// a . b_r for R rows b_r, with b_r's 16-lane groups from load_b(r, i) and single values from
// value_b(r, i)
template <int R, typename LoadB, typename ValueB>
inline void dot_rows_with(const float* a, int64_t K, LoadB load_b, ValueB value_b, float* out) {
  vf acc[R][4];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = vzero();
  int64_t i = 0;
  for (; i + 64 <= K; i += 64) {
    const vf a0 = vload(a + i), a1 = vload(a + i + 16), a2 = vload(a + i + 32),
             a3 = vload(a + i + 48);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vfma(a0, load_b(r, i), acc[r][0]);
      acc[r][1] = vfma(a1, load_b(r, i + 16), acc[r][1]);
      acc[r][2] = vfma(a2, load_b(r, i + 32), acc[r][2]);
      acc[r][3] = vfma(a3, load_b(r, i + 48), acc[r][3]);
    }
  }
  for (; i + 16 <= K; i += 16)
    for (int r = 0; r < R; ++r) acc[r][0] = vfma(vload(a + i), load_b(r, i), acc[r][0]);
  for (int r = 0; r < R; ++r) {
    float tail = 0.f;
    for (int64_t t = i; t < K; ++t) tail = std::fma(a[t], value_b(r, t), tail);
    out[r] = lanes_sum(acc[r][0], acc[r][1], acc[r][2], acc[r][3]) + tail;
  }
}

// a . b with b's 16-lane groups from load_b(i) and single values from value_b(i)
template <typename LoadB, typename ValueB>
inline float dot_with(const float* a, int64_t K, LoadB load_b, ValueB value_b) {
  float out;
  dot_rows_with<1>(a, K, [&](int, int64_t i) { return load_b(i); },
                   [&](int, int64_t i) { return value_b(i); }, &out);
  return out;
}

inline float dot(const float* a, const float* b, int64_t K) {
  return dot_with(a, K, [b](int64_t i) { return vload(b + i); }, [b](int64_t i) { return b[i]; });
}

// one row of W times one row of x without a buffer (decoding steps): the same sums as
// decode_row + dot, for blocks that are whole 64s
template <int BITS, typename ST>
float row_dot(const uint8_t* row, const ST* scale, const float* cb, int64_t K, int64_t kp,
              int64_t B, const float* x) {
  vf acc0 = vzero(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t full = K / 16 * 16, whole = K / 64 * 64;
  vf table[4];
  for (int64_t b0 = 0; b0 < full; b0 += B) {
    const vf sv = vset(to_float(scale[b0 / B]));
    make_tables<BITS>(cb, sv, table);
    auto w = [&](int64_t j) { return lookup16<BITS>(codes16<BITS>(row, kp, j), table, cb, sv); };
    const int64_t end = b0 + B < full ? b0 + B : full;
    int64_t j = b0;
    for (; j + 64 <= end && j + 64 <= whole; j += 64) {
      acc0 = vfma(vload(x + j), w(j), acc0);
      acc1 = vfma(vload(x + j + 16), w(j + 16), acc1);
      acc2 = vfma(vload(x + j + 32), w(j + 32), acc2);
      acc3 = vfma(vload(x + j + 48), w(j + 48), acc3);
    }
    for (; j < end; j += 16) acc0 = vfma(vload(x + j), w(j), acc0);
  }
  float tail = 0.f;
  for (int64_t i = full; i < K; ++i)
    tail = std::fma(x[i], cb[code_at<BITS>(row, kp, i)] * to_float(scale[i / B]), tail);
  return lanes_sum(acc0, acc1, acc2, acc3) + tail;
}

#include "cpu_pair4.h"

#else
constexpr int kRows = 1;

inline float dot(const float* a, const float* b, int64_t K) {
  float acc[64] = {0};
  int64_t i = 0;
  for (; i + 64 <= K; i += 64)
    for (int l = 0; l < 64; ++l) acc[l] = std::fma(a[i + l], b[i + l], acc[l]);
  for (; i + 16 <= K; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] = std::fma(a[i + l], b[i + l], acc[l]);
  float tail = 0.f;
  for (; i < K; ++i) tail = std::fma(a[i], b[i], tail);
  for (int l = 0; l < 16; ++l) acc[l] = (acc[l] + acc[l + 32]) + (acc[l + 16] + acc[l + 48]);
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0] + tail;
}
#endif

// rows of W times one row of x; `fused` false: there is none (decode + dot instead).
// one(n, x) gives row n's result; group(n, x, out) those of rows n..n+kRows-1
template <typename One, typename Group>
struct RowDot {
  bool fused;
  One one;
  Group group;
};
template <typename One, typename Group>
RowDot<One, Group> row_dot_fn(bool fused, One one, Group group) {
  return RowDot<One, Group>{fused, one, group};
}
template <typename One>
auto row_dot_fn(bool fused, One one) {  // rows in turn
  return row_dot_fn(fused, one, [one](int64_t n, const float* x, float* out) {
    for (int r = 0; r < kRows; ++r) out[r] = one(n + r, x);
  });
}

// the rows [n0, n1) of y (M, N): decode(n, buffer) writes row n of W; row_dot, where it is
// fused, gives rows times one row of x directly, with the same sums
template <typename Decode, typename RowDot>
void rows_times_x(const float* x, int64_t M, int64_t K, int64_t N, const float* bias,
                  float* y, int64_t n0, int64_t n1, Decode decode, RowDot row_dot) {
  if (M == 1 && row_dot.fused) {
    int64_t n = n0;
    for (float v[kRows]; n + kRows <= n1; n += kRows) {
      row_dot.group(n, x, v);
      for (int r = 0; r < kRows; ++r) y[n + r] = bias ? v[r] + bias[n + r] : v[r];
    }
    for (; n < n1; ++n) {
      const float v = row_dot.one(n, x);
      y[n] = bias ? v + bias[n] : v;
    }
    return;
  }
  std::vector<float> w(K);
  for (int64_t n = n0; n < n1; ++n) {
    const float b = bias ? bias[n] : 0.f;
    decode(n, w.data());
    for (int64_t m = 0; m < M; ++m) {
      const float v = dot(x + m * K, w.data(), K);
      y[m * N + n] = bias ? v + b : v;
    }
  }
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous() && x.size(1) == K,
              "kbitrt_cpu: x must be a contiguous fp32 CPU tensor (M, ", K, ")");
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
              "kbitrt_cpu: bias must be a contiguous fp32 (N,) tensor");
  return bias->data_ptr<float>();
}

// fn(std::integral_constant<int, bits>{}, absmax's data pointer (fp16 or fp32)), bits in 3..8
template <typename Fn>
void with_bits_and_scale(int64_t bits, const at::Tensor& absmax, Fn fn) {
  auto dispatch = [&](const auto* scale) {
    switch (bits) {
      case 3: fn(std::integral_constant<int, 3>{}, scale); break;
      case 4: fn(std::integral_constant<int, 4>{}, scale); break;
      case 5: fn(std::integral_constant<int, 5>{}, scale); break;
      case 6: fn(std::integral_constant<int, 6>{}, scale); break;
      case 7: fn(std::integral_constant<int, 7>{}, scale); break;
      default: fn(std::integral_constant<int, 8>{}, scale); break;
    }
  };
  if (absmax.scalar_type() == at::kHalf)
    dispatch(absmax.data_ptr<at::Half>());
  else
    dispatch(absmax.data_ptr<float>());
}

// run fn(decode_row<BITS, scale type>) for the tensor's bits and scale dtype
template <typename Fn>
void with_decoder(const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& codebook,
                  int64_t bits, int64_t block_size, int64_t K, Fn fn) {
  const int64_t N = qweight.size(0), kp = (K + 7) / 8 * 8, nb = (K + block_size - 1) / block_size;
  TORCH_CHECK(bits >= 3 && bits <= 8, "kbitrt_cpu: bits must be in 3..8");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(1) == kp * bits / 8,
              "kbitrt_cpu: qweight must be contiguous uint8 (N, Kp*bits/8)");
  TORCH_CHECK(absmax.is_contiguous() && absmax.dim() == 2 && absmax.size(0) == N &&
                  absmax.size(1) == nb &&
                  (absmax.scalar_type() == at::kHalf || absmax.scalar_type() == at::kFloat),
              "kbitrt_cpu: absmax must be contiguous fp16/fp32 (N, n_blocks)");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.numel() >= (1 << bits),
              "kbitrt_cpu: codebook must be fp32 with 2^bits entries");
  // padded to 256 entries so every register table and gather stays inside it
  std::vector<float> cb(256, 0.f);
  const auto cbc = codebook.contiguous();
  std::memcpy(cb.data(), cbc.data_ptr<float>(), sizeof(float) * (1 << bits));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const int64_t row_bytes = qweight.size(1);
  auto run = [&](auto tag, const auto* scale) {
    constexpr int BITS = decltype(tag)::value;
    const float* c = cb.data();
    auto decode = [=](int64_t n, float* out) {
      decode_row<BITS>(q + n * row_bytes, scale + n * nb, c, K, kp, block_size, out);
    };
#ifdef KBIT_SIMD
    if (BITS == 4 && block_size % 32 == 0) {
      auto decode_pair = [=](int64_t n, float* out) {
        decode_pair4(q + n * row_bytes, scale + n * nb, c, kp, block_size, 0, K, out);
      };
      auto one = [=](int64_t n, const float* xr) {
        float v;
        rows_dot_pair4<1>(q + n * row_bytes, row_bytes, scale + n * nb, nb, c, K, kp,
                          block_size, xr, &v);
        return v;
      };
      auto group = [=](int64_t n, const float* xr, float* out) {
        rows_dot_pair4<kRows>(q + n * row_bytes, row_bytes, scale + n * nb, nb, c, K, kp,
                              block_size, xr, out);
      };
      fn(decode, decode_pair, row_dot_fn(block_size % 64 == 0, one, group), true);
      return;
    }
    fn(decode, decode, row_dot_fn(block_size % 64 == 0, [=](int64_t n, const float* xr) {
      return row_dot<BITS>(q + n * row_bytes, scale + n * nb, c, K, kp, block_size, xr);
    }), false);
#else
    fn(decode, decode, row_dot_fn(false, [](int64_t, const float*) { return 0.f; }), false);
#endif
  };
  with_bits_and_scale(bits, absmax, run);
}

#include "cpu_gemm.h"
#include "cpu_int8.h"
#include "cpu_gemm_int8.h"

constexpr int64_t kFusedMaxRows = 32;  // kernels/cpu.py FUSED_MAX_ROWS: above, cpu_gemm.h

at::Tensor kbit_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                       const at::Tensor& codebook, const c10::optional<at::Tensor>& bias,
                       int64_t bits, int64_t block_size, int64_t in_features) {
  // 8-bit activations (int8_for): the decode path up to kFusedMaxRows rows, above its GEMM
  if (int8_for(bits) && block_size % kGroup == 0)
    return x.size(0) <= kFusedMaxRows
               ? kbit_linear_int8(x, qweight, absmax, codebook, bias, bits, block_size, in_features)
               : kbit_gemm_int8(x, qweight, absmax, codebook, bias, bits, block_size, in_features);
  check_x(x, in_features);
  const int64_t M = x.size(0), N = qweight.size(0), K = in_features;
  auto y = at::empty({M, N}, x.options());
  const float* b = bias_ptr(bias, N);
  if (M > kFusedMaxRows) {  // prefill: decoded tiles and a register-blocked GEMM
    kbit_gemm_into(x, qweight, absmax, codebook, b, bits, block_size, K, y.data_ptr<float>());
    return y;
  }
  with_decoder(qweight, absmax, codebook, bits, block_size, K,
               [&](auto, auto decode, auto rd, bool pair) {
    const float* xs = x.data_ptr<float>();
#ifdef KBIT_SIMD
    std::vector<float> xp(pair ? M * K : 0);
    for (int64_t m = 0; pair && m < M; ++m) to_pair_order(xs + m * K, K, xp.data() + m * K);
    if (pair) xs = xp.data();
#endif
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      rows_times_x(xs, M, K, N, b, y.data_ptr<float>(), n0, n1, decode, rd);
    });
  });
  return y;
}

at::Tensor kbit_dequantize(const at::Tensor& qweight, const at::Tensor& absmax,
                           const at::Tensor& codebook, int64_t bits, int64_t block_size,
                           int64_t in_features) {
  const int64_t N = qweight.size(0), K = in_features;
  auto w = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  float* out = w.data_ptr<float>();
  with_decoder(qweight, absmax, codebook, bits, block_size, K,
               [&](auto decode, auto, auto, bool) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) decode(n, out + n * K);
    });
  });
  return w;
}

// y = x W^T for a 16-bit W (an output head, often the tied embedding): fp32 products and sums
template <typename WT>
void half_rows(const float* x, int64_t M, int64_t K, int64_t N, const WT* wp, const float* b,
               float* y) {
  auto decode = [=](int64_t n, float* out) {
    const WT* src = wp + n * K;
    int64_t i = 0;
#ifdef KBIT_SIMD
    for (; i + 16 <= K; i += 16) vstore(out + i, load16(src + i));
#endif
    for (; i < K; ++i) out[i] = static_cast<float>(src[i]);
  };
#ifdef KBIT_SIMD
  auto rows = [=](auto count, int64_t n, const float* xr, float* out) {  // W converted on the fly
    const WT* src = wp + n * K;
    dot_rows_with<decltype(count)::value>(
        xr, K, [src, K](int r, int64_t i) { return load16(src + r * K + i); },
        [src, K](int r, int64_t i) { return static_cast<float>(src[r * K + i]); }, out);
  };
  auto rd = row_dot_fn(
      true,
      [=](int64_t n, const float* xr) {
        float v;
        rows(std::integral_constant<int, 1>{}, n, xr, &v);
        return v;
      },
      [=](int64_t n, const float* xr, float* out) {
        rows(std::integral_constant<int, kRows>{}, n, xr, out);
      });
#else
  auto rd = row_dot_fn(false, [](int64_t, const float*) { return 0.f; });
#endif
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    rows_times_x(x, M, K, N, b, y, n0, n1, decode, rd);
  });
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK((weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) &&
                  weight.is_contiguous() && weight.dim() == 2,
              "kbitrt_cpu: weight must be contiguous fp16 or bf16 (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1), M = x.size(0);
  check_x(x, K);
  auto y = at::empty({M, N}, x.options());
  const float* b = bias_ptr(bias, N);
  if (weight.scalar_type() == at::kHalf)
    half_rows(x.data_ptr<float>(), M, K, N, weight.data_ptr<at::Half>(), b, y.data_ptr<float>());
  else
    half_rows(x.data_ptr<float>(), M, K, N, weight.data_ptr<at::BFloat16>(), b,
              y.data_ptr<float>());
  return y;
}

// 512 or 256 where the AVX-512 or AVX2 paths are compiled in, 0 for the portable loops
int64_t simd_width() {
#ifdef KBIT_SIMD
  return KBIT_SIMD;
#else
  return 0;
#endif
}

#include "cpu_planes.h"
#include "cpu_layers.h"

}  // namespace

// the op namespace: kbitrt_cpu, or another for a second build in the same process (tests build
// the portable loops beside the native ones)
#ifndef KBIT_NS
#define KBIT_NS kbitrt_cpu
#endif

TORCH_LIBRARY(KBIT_NS, m) {
  m.def("kbit_linear(Tensor x, Tensor qweight, Tensor absmax, Tensor codebook, Tensor? bias, "
        "int bits, int block_size, int in_features) -> Tensor");
  m.def("kbit_dequantize(Tensor qweight, Tensor absmax, Tensor codebook, int bits, "
        "int block_size, int in_features) -> Tensor");
  m.def("half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("kbit_linear_planes(Tensor x, Tensor planes, Tensor absmax, Tensor codebook, "
        "Tensor? bias, int k_planes, int block_size, int in_features) -> Tensor");
  m.def("kbit_dequantize_planes(Tensor planes, Tensor absmax, Tensor codebook, int k_planes, "
        "int block_size, int in_features) -> Tensor");
  m.def("simd_width() -> int", &simd_width);
  m.def("kbit_linear_int8(Tensor x, Tensor qweight, Tensor absmax, Tensor codebook, Tensor? bias, "
        "int bits, int block_size, int in_features) -> Tensor");
  m.def("set_int8_activations(int mode) -> ()", &set_int8_activations);
  m.def("set_token_region(bool on) -> ()", &set_token_region);
  m.def("token_region_steps() -> int", &token_region_steps);
  m.def("int8_width() -> int", &int8_width);
  m.def("layer_stack_create(Tensor[] tensors, int[] config, float eps) -> int",
        &layer_stack_create);
  m.def("layer_stack_free(int handle) -> ()", &layer_stack_free);
  m.def("layer_stack_forward(int handle, Tensor x, Tensor input_pos, Tensor cos, Tensor sin, "
        "Tensor[] masks, Tensor norm_w, Tensor norm_b) -> Tensor", &layer_stack_forward);
}

TORCH_LIBRARY_IMPL(KBIT_NS, CPU, m) {
  m.impl("kbit_linear", &kbit_linear);
  m.impl("kbit_linear_int8", &kbit_linear_int8);
  m.impl("kbit_dequantize", &kbit_dequantize);
  m.impl("half_linear", &half_linear);
  m.impl("kbit_linear_planes", &kbit_linear_planes);
  m.impl("kbit_dequantize_planes", &kbit_dequantize_planes);
}
