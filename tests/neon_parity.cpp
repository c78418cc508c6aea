// The NEON block of kbitrt/runtime/kernels/cpu_simd.h (KBIT_SIMD == 128) against the portable
// loops of cpu_kernels.cpp, bit for bit, with no torch: built by tests/test_neon_qemu.py with
// aarch64-linux-gnu-g++ and run under qemu-aarch64. It composes the NEON operations the way the
// kernels' vector paths do (codes16, decode_row, dot, row_dot, half-weight loads) and checks,
// for k = 3..8 and several K and block sizes, that every value equals the portable result.
#include <arm_neon.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace at {  // the two 16-bit types cpu_simd.h reads (torch's are these 16 bits too)
struct Half {
  uint16_t x;
};
struct BFloat16 {
  uint16_t x;
};
}  // namespace at

#define KBIT_SIMD 128
#include "../kbitrt/runtime/kernels/cpu_simd.h"

// bitslice-v1 (kbitrt/format/packing.py), as cpu_kernels.cpp's Layout
struct Slice {
  int width, shift, offset;
};
struct Layout {
  int n;
  Slice s[3];
};
Layout layout(int bits) {
  switch (bits) {
    case 3: return {2, {{2, 0, 0}, {1, 2, 2}}};
    case 4: return {1, {{4, 0, 0}}};
    case 5: return {2, {{4, 0, 0}, {1, 4, 4}}};
    case 6: return {2, {{4, 0, 0}, {2, 4, 4}}};
    case 7: return {3, {{4, 0, 0}, {2, 4, 4}, {1, 6, 6}}};
    default: return {1, {{8, 0, 0}}};
  }
}

// ------------------------------------------------------------------ the portable loops (reference)
int code_at(int bits, const uint8_t* row, int64_t kp, int64_t i) {
  const Layout L = layout(bits);
  int c = 0;
  for (int t = 0; t < L.n; ++t) {
    const Slice s = L.s[t];
    const int per = 8 / s.width;
    const uint8_t byte = row[s.offset * (kp / 8) + i / per];
    c |= ((byte >> ((i % per) * s.width)) & ((1 << s.width) - 1)) << s.shift;
  }
  return c;
}

void decode_portable(int bits, const uint8_t* row, const float* scale, const float* cb, int64_t K,
                     int64_t kp, int64_t B, float* out) {
  for (int64_t i = 0; i < K; ++i) out[i] = cb[code_at(bits, row, kp, i)] * scale[i / B];
}

float dot_portable(const float* a, const float* b, int64_t K) {
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

// -------------------------------------------------------------- the NEON paths (cpu_simd.h's ops)
vi codes16(int bits, const uint8_t* row, int64_t kp, int64_t j) {
  const Layout L = layout(bits);
  vi c{};
  for (int t = 0; t < L.n; ++t) {
    const Slice s = L.s[t];
    const uint8_t* src = row + s.offset * (kp / 8) + j * s.width / 8;
    const vi v = s.width == 8   ? slice16<8>(src)
                 : s.width == 4 ? slice16<4>(src)
                 : s.width == 2 ? slice16<2>(src)
                                : slice16<1>(src);
    c = t == 0 ? v : vor(c, vsll(v, s.shift));
  }
  return c;
}

// codebook[c] * scale: a register table (codebook * scale) at k <= 4, else a gather and a product
vf lookup16(int bits, vi c, vf table, const float* cb, vf scale) {
  return bits <= 4 ? lut16(c, table) : vmul(vgather(c, cb), scale);
}

void decode_neon(int bits, const uint8_t* row, const float* scale, const float* cb, int64_t K,
                 int64_t kp, int64_t B, float* out) {
  const int64_t full = K / 16 * 16;
  for (int64_t b0 = 0; b0 < full; b0 += B) {
    const vf sv = vset(scale[b0 / B]);
    const vf table = vmul(vload(cb), sv);
    for (int64_t j = b0; j < b0 + B && j < full; j += 16)
      vstore(out + j, lookup16(bits, codes16(bits, row, kp, j), table, cb, sv));
  }
  for (int64_t i = full; i < K; ++i) out[i] = cb[code_at(bits, row, kp, i)] * scale[i / B];
}

float lanes_sum(vf a0, vf a1, vf a2, vf a3) { return vsum16(vadd(vadd(a0, a2), vadd(a1, a3))); }

float dot_neon(const float* a, const float* b, int64_t K) {
  vf acc0 = vzero(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t i = 0;
  for (; i + 64 <= K; i += 64) {
    acc0 = vfma(vload(a + i), vload(b + i), acc0);
    acc1 = vfma(vload(a + i + 16), vload(b + i + 16), acc1);
    acc2 = vfma(vload(a + i + 32), vload(b + i + 32), acc2);
    acc3 = vfma(vload(a + i + 48), vload(b + i + 48), acc3);
  }
  for (; i + 16 <= K; i += 16) acc0 = vfma(vload(a + i), vload(b + i), acc0);
  float tail = 0.f;
  for (; i < K; ++i) tail = std::fma(a[i], b[i], tail);
  return lanes_sum(acc0, acc1, acc2, acc3) + tail;
}

// one row times x without a buffer (cpu_kernels.cpp's row_dot), blocks of whole 64s
float row_dot_neon(int bits, const uint8_t* row, const float* scale, const float* cb, int64_t K,
                   int64_t kp, int64_t B, const float* x) {
  vf acc0 = vzero(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t full = K / 16 * 16, whole = K / 64 * 64;
  for (int64_t b0 = 0; b0 < full; b0 += B) {
    const vf sv = vset(scale[b0 / B]);
    const vf table = vmul(vload(cb), sv);
    auto w = [&](int64_t j) { return lookup16(bits, codes16(bits, row, kp, j), table, cb, sv); };
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
    tail = std::fma(x[i], cb[code_at(bits, row, kp, i)] * scale[i / B], tail);
  return lanes_sum(acc0, acc1, acc2, acc3) + tail;
}

// ------------------------------------------------------------------------------------ the checks
uint32_t rng = 12345;
uint32_t next() { return rng = rng * 1664525u + 1013904223u; }
float uniform() { return static_cast<float>(next() >> 8) / 16777216.f * 2.f - 1.f; }

int failures = 0, checks = 0;
void expect_same(const char* what, int bits, int64_t K, int64_t i, float want, float got) {
  ++checks;
  if (std::memcmp(&want, &got, 4) != 0 && failures++ < 10)
    std::printf("MISMATCH %s bits=%d K=%lld i=%lld: portable %.9g neon %.9g\n", what, bits,
                static_cast<long long>(K), static_cast<long long>(i), want, got);
}

float half_to_float(uint16_t h) {  // IEEE binary16 -> fp32, subnormals and inf/nan included
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float v;
  if (exp == 0)
    v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31)
    v = man ? NAN : INFINITY;
  else
    v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  uint32_t bitsv;
  std::memcpy(&bitsv, &v, 4);
  bitsv |= sign;
  std::memcpy(&v, &bitsv, 4);
  return v;
}

void check_rows(int bits, int64_t K, int64_t B) {
  const int64_t kp = (K + 7) / 8 * 8, nb = (K + B - 1) / B;
  std::vector<uint8_t> row(kp * bits / 8 + 16);  // + the 16 bytes a vector load may read past
  for (auto& b : row) b = static_cast<uint8_t>(next() >> 24);
  std::vector<float> cb(256, 0.f), scale(nb), x(K), want(K), got(K);
  for (int c = 0; c < (1 << bits); ++c) cb[c] = uniform();
  for (auto& s : scale) s = 0.5f + uniform();
  for (auto& v : x) v = uniform();
  decode_portable(bits, row.data(), scale.data(), cb.data(), K, kp, B, want.data());
  decode_neon(bits, row.data(), scale.data(), cb.data(), K, kp, B, got.data());
  for (int64_t i = 0; i < K; ++i) expect_same("decode", bits, K, i, want[i], got[i]);
  const float d = dot_portable(x.data(), want.data(), K);
  expect_same("dot", bits, K, -1, d, dot_neon(x.data(), got.data(), K));
  if (B % 64 == 0)
    expect_same("row_dot", bits, K, -1, d,
                row_dot_neon(bits, row.data(), scale.data(), cb.data(), K, kp, B, x.data()));
}

void check_half() {
  std::vector<at::Half> h(4096);
  std::vector<at::BFloat16> bf(4096);
  for (int i = 0; i < 4096; ++i) {  // every 16th fp16 bit pattern and random bf16 ones
    h[i].x = static_cast<uint16_t>(i * 16 + (next() & 15));
    bf[i].x = static_cast<uint16_t>(next() >> 16);
  }
  float out[16];
  for (int i = 0; i < 4096; i += 16) {
    vstore(out, load16(h.data() + i));
    for (int l = 0; l < 16; ++l) {
      const float want = half_to_float(h[i + l].x);
      if (!(std::isnan(want) && std::isnan(out[l]))) expect_same("fp16", 16, 0, i + l, want, out[l]);
    }
    vstore(out, load16(bf.data() + i));
    for (int l = 0; l < 16; ++l) {
      const uint32_t u = static_cast<uint32_t>(bf[i + l].x) << 16;
      float want;
      std::memcpy(&want, &u, 4);
      if (!(std::isnan(want) && std::isnan(out[l]))) expect_same("bf16", 16, 0, i + l, want, out[l]);
    }
  }
}

int main() {
  const int64_t sizes[][2] = {{64, 64}, {256, 64}, {576, 64}, {200, 32}, {352, 32}, {71, 64},
                              {1000, 128}, {48, 16}};
  for (int bits = 3; bits <= 8; ++bits)
    for (const auto& kb : sizes) check_rows(bits, kb[0], kb[1]);
  check_half();
  if (failures) {
    std::printf("FAILED %d of %d checks\n", failures, checks);
    return 1;
  }
  std::printf("OK %d checks\n", checks);
  return 0;
}
