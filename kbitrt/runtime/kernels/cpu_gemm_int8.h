// The prefill GEMM under 8-bit activations (docs/cpu.md, "int8 activations"): kbit_linear above
// FUSED_MAX_ROWS rows when int8_for(bits). Included inside cpu_kernels.cpp's anonymous namespace
// after cpu_int8.h, whose arithmetic it keeps (twin: kernels/int8_reference.py): x quantized per
// row in groups of 32 by quantize_x, W's codes as the int8 codebook cbq (+ 128), per group the
// exact int32 sum S of cbq * xq, and y[m, n] = sum over groups of (d[m, g] * absmax[n, g]) * S.
// Only the order of the fp32 sums differs from the decode path (kbit_linear_int8), so a prefill
// row matches what that path gives for it to fp32 rounding.
//
// AVX-512 VBMI + VNNI: one group per int32 lane. A superblock of 16 groups (512 values) is stored
// with word (4 bytes) i of group g at lane g of 64-byte step i, for x (quantized once per call)
// and for W (each worker decodes a panel of rows into cbq + 128 bytes, in L2). A tile of kTr W
// rows x kTm tokens then sums 8 vpdpbusd per superblock into int32 lanes that each hold one
// group's exact S (started at -128 * sum(xq), the unsigned operand's correction), and scales them
// into fp32 once per superblock: 64 products per instruction, against 16 for the fp32 GEMM's FMA.
// Every output is one fixed chain (lanes in superblock order, then the tree of vsum16), whatever
// M, the tile it falls in or the worker, so y[m] does not depend on M above FUSED_MAX_ROWS.
// AVX2: the same panels and tiles at half the width (8 groups a superblock), products by maddubs
// with the sign trick, instead of the decode path's rows (docs/cpu.md, "On an AVX2-only CPU").
// The portable loops run the decode path's rows at any M.
#pragma once

// x quantized for the tile: rows padded to kTm (zeros), K to kq, each row's bytes in the
// superblock order (AVX2: its whole superblocks, then the rest in order), its group scales d and
// (AVX-512) -128 * sum(xq) per group
struct PackedX8 {
  int64_t kq, ng;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> nc;
};

// px sized for kq values a row and M rows padded to tm (zeros), x quantized (quantize_x) a chunk
// of rows per worker, and pack(m, qx, r) called for each row m: row r of the chunk's qx
template <typename Pack>
void pack_x_rows(const float* x, int64_t M, int64_t K, float cfac, int64_t kq, int64_t tm,
                 bool sums, PackedX8& px, Pack pack) {
  const int64_t ng = kq / kGroup, rows = (M + tm - 1) / tm * tm;
  px.kq = kq;
  px.ng = ng;
  px.q.assign(rows * kq, 0);
  px.d.assign(rows * ng, 0.f);
  px.nc.assign(sums ? rows * ng : 0, 0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    QuantX qx;
    quantize_x(x + m0 * K, m1 - m0, K, cfac, qx);
    for (int64_t m = m0; m < m1; ++m) pack(m, qx, m - m0);
  });
}

#if KBIT_INT8 == 512
constexpr int64_t kSuper = 16 * kGroup;  // values per superblock: one group per lane
constexpr int kTr = 4, kTm = 6;          // W rows x tokens per tile: 24 int32 accumulators
constexpr int64_t kInt8PanelBytes = 384 * 1024;  // a worker's decoded W rows: in L2 beside x
constexpr int kLanes = 16;                       // groups per superblock: int32 lanes a register

// the tile's last argument: the groups of K in the last superblock (1..16)
inline int64_t int8_gemm_tail(int64_t K, int64_t kq) {
  return (K + kGroup - 1) / kGroup - (kq / kSuper - 1) * (kSuper / kGroup);
}

// the index vectors of the superblock transpose: three rounds, each pairing registers r and
// r | 1 << k and keeping in r the words whose i has bit k clear (in word order), so after the
// last round register i holds word i of groups 0..15 in lane order
struct SuperTranspose {
  alignas(64) int32_t idx[3][4][2][16];
  SuperTranspose() {
    int id[8][16];  // the word each lane holds: g * 8 + i (g the group, i its word)
    for (int r = 0; r < 8; ++r)
      for (int l = 0; l < 16; ++l) id[r][l] = r * 16 + l;
    for (int k = 0; k < 3; ++k)
      for (int r = 0, p = 0; r < 8; ++r) {
        if (r >> k & 1) continue;
        const int b = r | 1 << k;
        int out[2][16], n[2] = {0, 0};
        for (int want = 0; want < 128; ++want)  // in word order
          for (int s = 0; s < 32; ++s) {
            const int w = s < 16 ? id[r][s] : id[b][s - 16];
            if (w != want) continue;
            const int half = (w % 8) >> k & 1;
            idx[k][p][half][n[half]] = s;
            out[half][n[half]++] = w;
          }
        std::memcpy(id[r], out[0], sizeof out[0]);
        std::memcpy(id[b], out[1], sizeof out[1]);
        ++p;
      }
  }
};

// v[c] (64 bytes: words 0..7 of groups 2c and 2c + 1) -> v[i] (word i of groups 0..15)
inline void transpose_super(__m512i* v) {
  static const SuperTranspose t;
  for (int k = 0; k < 3; ++k)
    for (int r = 0, p = 0; r < 8; ++r) {
      if (r >> k & 1) continue;
      const int b = r | 1 << k;
      const __m512i lo = _mm512_permutex2var_epi32(
          v[r], _mm512_load_si512(t.idx[k][p][0]), v[b]);
      v[b] = _mm512_permutex2var_epi32(v[r], _mm512_load_si512(t.idx[k][p][1]), v[b]);
      v[r] = lo;
      ++p;
    }
}

void pack_x_int8(const float* x, int64_t M, int64_t K, float cfac, PackedX8& px) {
  const int64_t kq = (K + kSuper - 1) / kSuper * kSuper, ng = kq / kGroup;
  pack_x_rows(x, M, K, cfac, kq, kTm, true, px, [&](int64_t m, const QuantX& qx, int64_t r) {
    const int64_t kx = qx.kx;
    const int8_t* src = qx.q.data() + r * kx;
    for (int64_t s = 0; s < kq; s += kSuper) {
      __m512i v[8];
      for (int c = 0; c < 8; ++c) {
        const int64_t j = s + 64 * c;  // kx is a multiple of 64
        v[c] = j < kx ? _mm512_loadu_si512(src + j) : _mm512_setzero_si512();
      }
      transpose_super(v);
      for (int i = 0; i < 8; ++i) _mm512_storeu_si512(px.q.data() + m * kq + s + 64 * i, v[i]);
    }
    for (int64_t g = 0; g < kx / kGroup; ++g) {
      px.d[m * ng + g] = qx.d[r * (kx / kGroup) + g];
      int32_t c = 0;
      for (int l = 0; l < kGroup / 4; ++l) c += qx.nc[r * (kx / 4) + g * kGroup / 4 + l];
      px.nc[m * ng + g] = c;
    }
  });
}

// rows [n0, n0 + rows) of W as cbq + 128 bytes in the superblock order (wp, kq per row) and the
// block scale of each group (wa, ng per row); rows up to `padded` and groups past K: scale 0
template <int BITS, typename ST>
void decode_panel_int8(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
                       const Int8Tables& t, int64_t K, int64_t B, int64_t kq, int64_t ng,
                       int64_t n0, int64_t rows, int64_t padded, uint8_t* wp, float* wa) {
  __m512i tab[4];
  for (int i = 0; i < 4; ++i) tab[i] = _mm512_load_si512(t.u8 + 64 * i);
  const int64_t kp = (K + 7) / 8 * 8, full = K / 64 * 64;
  alignas(64) uint8_t tail[64];
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = q + (n0 + r) * row_bytes;
    for (int64_t s = 0; s < kq; s += kSuper) {
      __m512i v[8];
      for (int c = 0; c < 8; ++c) {
        const int64_t j = s + 64 * c;
        if (j < full) {
          v[c] = lookup64<BITS>(codes64<BITS>(row, kp, j), tab);
          continue;
        }
        for (int l = 0; l < 64; ++l)  // past K: any byte (x is 0 there)
          tail[l] = j + l < K ? t.u8[code_at<BITS>(row, kp, j + l)] : 128;
        v[c] = _mm512_load_si512(tail);
      }
      transpose_super(v);
      for (int i = 0; i < 8; ++i) _mm512_storeu_si512(wp + r * kq + s + 64 * i, v[i]);
    }
    const ST* sr = scale + (n0 + r) * nb;
    for (int64_t g = 0; g < ng; ++g)
      wa[r * ng + g] = g * kGroup < K ? to_float(sr[g * kGroup / B]) : 0.f;
  }
  std::memset(wp + rows * kq, 128, (padded - rows) * kq);
  std::fill(wa + rows * ng, wa + padded * ng, 0.f);
}

// the last superblock when it holds at most 8 groups of K (K = 576: one whole superblock and 2
// groups): its lanes 0..7 at 256 bits, half the work of the full width (lanes 8..15 hold zero
// padding, whose products add nothing)
inline void int8_gemm_half_super(const uint8_t* wp, const float* wa, const int8_t* xq,
                                 const float* xd, const int32_t* xnc, int64_t kq, int64_t ng,
                                 int64_t s, float (*acc)[kTm][16]) {
  const int64_t g = s / kGroup;
  __m256i sum[kTr][kTm];
  for (int m = 0; m < kTm; ++m) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xnc + m * ng + g));
    for (int r = 0; r < kTr; ++r) sum[r][m] = c;
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    __m256i w[kTr];
    for (int r = 0; r < kTr; ++r)
      w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * kq + s + 64 * i));
    for (int m = 0; m < kTm; ++m) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * kq + s + 64 * i));
      __asm__("" : "+v"(xv));  // as in int8_gemm_tile
      for (int r = 0; r < kTr; ++r) sum[r][m] = _mm256_dpbusd_epi32(sum[r][m], w[r], xv);
    }
  }
  for (int m = 0; m < kTm; ++m) {
    const __m256 d = _mm256_loadu_ps(xd + m * ng + g);
    for (int r = 0; r < kTr; ++r)
      _mm256_store_ps(acc[r][m], _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][m]),
                                                 _mm256_mul_ps(d, _mm256_loadu_ps(wa + r * ng + g)),
                                                 _mm256_load_ps(acc[r][m])));
  }
}

// out[r * kTm + m] = y of W row r (of wp, wa) and token m0 + m of px, without bias; acc:
// the fp32 sums, touched once per superblock (kept in L1: the registers hold the int32 sums);
// tail_groups: the groups of K in the last superblock (1..16)
inline void int8_gemm_tile(const uint8_t* wp, const float* wa, const PackedX8& px, int64_t m0,
                           int64_t tail_groups, float (*acc)[kTm][kLanes], float* out) {
  const int64_t kq = px.kq, ng = px.ng;
  const int8_t* xq = px.q.data() + m0 * kq;
  const float* xd = px.d.data() + m0 * ng;
  const int32_t* xnc = px.nc.data() + m0 * ng;
  for (int r = 0; r < kTr; ++r)
    for (int m = 0; m < kTm; ++m) _mm512_store_ps(acc[r][m], _mm512_setzero_ps());
  const int64_t wide = tail_groups <= 8 ? kq - kSuper : kq;  // superblocks at full width
  for (int64_t s = 0; s < wide; s += kSuper) {
    const int64_t g = s / kGroup;
    __m512i sum[kTr][kTm];
    for (int m = 0; m < kTm; ++m) {
      const __m512i c = _mm512_loadu_si512(xnc + m * ng + g);
      for (int r = 0; r < kTr; ++r) sum[r][m] = c;
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m512i w[kTr];
      for (int r = 0; r < kTr; ++r) w[r] = _mm512_loadu_si512(wp + r * kq + s + 64 * i);
      for (int m = 0; m < kTm; ++m) {
        __m512i xv = _mm512_loadu_si512(xq + m * kq + s + 64 * i);
        // one load of x per token and step, in a register: folded into each vpdpbusd (as the
        // compiler would) the loads, not the products, bound the loop
        __asm__("" : "+v"(xv));
        for (int r = 0; r < kTr; ++r) sum[r][m] = _mm512_dpbusd_epi32(sum[r][m], w[r], xv);
      }
    }
    __m512 a[kTr];
    for (int r = 0; r < kTr; ++r) a[r] = _mm512_loadu_ps(wa + r * ng + g);
    for (int m = 0; m < kTm; ++m) {
      const __m512 d = _mm512_loadu_ps(xd + m * ng + g);
      for (int r = 0; r < kTr; ++r)
        _mm512_store_ps(acc[r][m], _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][m]),
                                                   _mm512_mul_ps(d, a[r]),
                                                   _mm512_load_ps(acc[r][m])));
    }
  }
  if (wide < kq) int8_gemm_half_super(wp, wa, xq, xd, xnc, kq, ng, wide, acc);
  for (int r = 0; r < kTr; ++r)
    for (int m = 0; m < kTm; ++m) out[r * kTm + m] = vsum16(_mm512_load_ps(acc[r][m]));
}

#elif KBIT_INT8 == 256
// AVX2: the same panels and tiles at 8 groups per superblock (256 values), with int8 W (cbq, not
// + 128: no vpdpbusd) and maddubs's sign trick, as the decode rows (cpu_int8.h): per step and
// pair of W row and token, sign, maddubs and madd with ones into 8 int32 lanes, one group each,
// and their fp32 sums once per superblock. The part of K after the whole superblocks stays in
// order, a group per step, its 8 lanes (4 bytes each) scaled by the group's scale into the same
// fp32 lanes. Every output is one fixed chain, whatever M or the tile.
constexpr int64_t kSuper = 8 * kGroup;           // values per superblock: one group per lane
constexpr int kTr = 2, kTm = 4;                  // W rows x tokens per tile: 8 int32 sums
constexpr int64_t kInt8PanelBytes = 256 * 1024;  // a worker's decoded W rows: in L2 beside x
constexpr int kLanes = 8;

// the tile's last argument: the values of K in whole superblocks
inline int64_t int8_gemm_tail(int64_t K, int64_t) { return K / kSuper * kSuper; }

// v[g] (group g's 8 words of 4 bytes) -> v[i] (word i of groups 0..7): the 8 x 8 transpose
inline void transpose_super(__m256i* v) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);      // words 0 1 | 4 5 of the pair
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);  // words 2 3 | 6 7
  }
  for (int h = 0; h < 2; ++h)  // groups 4h..4h+3
    for (int i = 0; i < 2; ++i) {
      u[4 * h + 2 * i] = _mm256_unpacklo_epi64(t[4 * h + i], t[4 * h + 2 + i]);      // word 2i | 2i+4
      u[4 * h + 2 * i + 1] = _mm256_unpackhi_epi64(t[4 * h + i], t[4 * h + 2 + i]);  // 2i+1 | 2i+5
    }
  for (int w = 0; w < 4; ++w) {
    v[w] = _mm256_permute2x128_si256(u[w], u[4 + w], 0x20);
    v[w + 4] = _mm256_permute2x128_si256(u[w], u[4 + w], 0x31);
  }
}

// the whole superblocks of a row in order (src) -> in the superblock order (dst; may be src)
inline void transpose_whole(const void* src, void* dst, int64_t whole) {
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t s = 0; s < whole; s += kSuper) {
    __m256i v[8];
    for (int g = 0; g < 8; ++g)
      v[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + s + kGroup * g));
    transpose_super(v);
    for (int i = 0; i < 8; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + s + kGroup * i), v[i]);
  }
}

void pack_x_int8(const float* x, int64_t M, int64_t K, float cfac, PackedX8& px) {
  const int64_t kq = (K + kGroup - 1) / kGroup * kGroup, ng = kq / kGroup, whole = K / kSuper * kSuper;
  pack_x_rows(x, M, K, cfac, kq, kTm, false, px, [&](int64_t m, const QuantX& qx, int64_t r) {
    const int64_t kx = qx.kx;
    const int8_t* src = qx.q.data() + r * kx;
    int8_t* dst = px.q.data() + m * kq;
    transpose_whole(src, dst, whole);
    std::memcpy(dst + whole, src + whole, kq - whole);
    std::memcpy(px.d.data() + m * ng, qx.d.data() + r * (kx / kGroup), ng * sizeof(float));
  });
}

// rows [n0, n0 + rows) of W as cbq (int8) in px's order (wp, kq per row) and each group's block
// scale (wa, ng per row); rows up to `padded`: zeros
template <int BITS, typename ST>
void decode_panel_int8(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
                       const Int8Tables& t, int64_t K, int64_t B, int64_t kq, int64_t ng,
                       int64_t n0, int64_t rows, int64_t padded, uint8_t* wp, float* wa) {
  __m256i tab[16];
  for (int i = 0; i < 16 && i < (1 << BITS) / 16 + (BITS < 4); ++i)
    tab[i] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t.s8 + 16 * i)));
  const int64_t kp = (K + 7) / 8 * 8, full = K / kGroup * kGroup, whole = K / kSuper * kSuper;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = q + (n0 + r) * row_bytes;
    uint8_t* dst = wp + r * kq;
    for (int64_t j = 0; j < full; j += kGroup) {
      const __m256i c = codes32<BITS>(row, kp, j);
      const __m256i w = BITS == 8 && t.linear8 ? _mm256_sub_epi8(c, _mm256_set1_epi8(127))
                                               : lookup32<BITS>(c, tab);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), w);
    }
    for (int64_t i = full; i < kq; ++i)  // past K: 0 (x is 0 there too)
      dst[i] = i < K ? static_cast<uint8_t>(t.s8[code_at<BITS>(row, kp, i)]) : 0;
    transpose_whole(dst, dst, whole);
    const ST* sr = scale + (n0 + r) * nb;
    for (int64_t g = 0; g < ng; ++g) wa[r * ng + g] = to_float(sr[g * kGroup / B]);
  }
  std::memset(wp + rows * kq, 0, (padded - rows) * kq);
  std::fill(wa + rows * ng, wa + padded * ng, 0.f);
}

// the exact int32 products of 8 x 4 bytes of W (w, its |w| in aw) and x: sign, maddubs, madd
inline __m256i int8_products(__m256i aw, __m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

// out[r * kTm + m] = y of W row r (of wp, wa) and token m0 + m of px, without bias; acc: the
// fp32 sums (in L1), touched once per superblock and once per group after
inline void int8_gemm_tile(const uint8_t* wp8, const float* wa, const PackedX8& px, int64_t m0,
                           int64_t whole, float (*acc)[kTm][kLanes], float* out) {
  const int64_t kq = px.kq, ng = px.ng;
  const int8_t* wp = reinterpret_cast<const int8_t*>(wp8);
  const int8_t* xq = px.q.data() + m0 * kq;
  const float* xd = px.d.data() + m0 * ng;
  for (int r = 0; r < kTr; ++r)
    for (int m = 0; m < kTm; ++m) _mm256_store_ps(acc[r][m], _mm256_setzero_ps());
  for (int64_t s = 0; s < whole; s += kSuper) {
    const int64_t g = s / kGroup;
    __m256i sum[kTr][kTm];
    for (int r = 0; r < kTr; ++r)
      for (int m = 0; m < kTm; ++m) sum[r][m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m256i w[kTr], aw[kTr];
      for (int r = 0; r < kTr; ++r) {
        w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * kq + s + 32 * i));
        aw[r] = _mm256_abs_epi8(w[r]);
      }
      for (int m = 0; m < kTm; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * kq + s + 32 * i));
        for (int r = 0; r < kTr; ++r)
          sum[r][m] = _mm256_add_epi32(sum[r][m], int8_products(aw[r], w[r], xv));
      }
    }
    for (int m = 0; m < kTm; ++m) {
      const __m256 d = _mm256_loadu_ps(xd + m * ng + g);
      for (int r = 0; r < kTr; ++r)
        _mm256_store_ps(acc[r][m], _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][m]),
                                                   _mm256_mul_ps(d, _mm256_loadu_ps(wa + r * ng + g)),
                                                   _mm256_load_ps(acc[r][m])));
    }
  }
  for (int64_t j = whole; j < kq; j += kGroup) {  // the rest: a group per step, in order
    const int64_t g = j / kGroup;
    __m256i w[kTr], aw[kTr];
    for (int r = 0; r < kTr; ++r) {
      w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * kq + j));
      aw[r] = _mm256_abs_epi8(w[r]);
    }
    for (int m = 0; m < kTm; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * kq + j));
      for (int r = 0; r < kTr; ++r)
        _mm256_store_ps(acc[r][m], _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(int8_products(aw[r], w[r], xv)),
            _mm256_set1_ps(xd[m * ng + g] * wa[r * ng + g]), _mm256_load_ps(acc[r][m])));
    }
  }
  for (int r = 0; r < kTr; ++r)
    for (int m = 0; m < kTm; ++m) out[r * kTm + m] = sum8(_mm256_load_ps(acc[r][m]));
}
#endif

#ifdef KBIT_INT8
// W rows per panel: whole tiles, as many as kInt8PanelBytes holds, and at least two panels per
// thread where N allows (the workers share the panels)
inline int64_t int8_panel_rows(int64_t kq, int64_t N) {
  const int64_t fit = std::max<int64_t>(1, kInt8PanelBytes / (kq * kTr));
  const int64_t share = (N + 2 * at::get_num_threads() * kTr - 1) / (2 * at::get_num_threads() * kTr);
  return std::max<int64_t>(1, std::min(fit, share)) * kTr;
}

template <int BITS, typename ST>
void int8_gemm_panels(const uint8_t* q, int64_t row_bytes, const ST* scale, int64_t nb,
                      const Int8Tables& t, int64_t K, int64_t B, const PackedX8& px, int64_t M,
                      int64_t N, const float* bias, float* y) {
  const int64_t kq = px.kq, ng = px.ng, nc = int8_panel_rows(kq, N), tiles = (N + nc - 1) / nc;
  const int64_t tail = int8_gemm_tail(K, kq);
  std::atomic<int64_t> next{0};  // workers take the next panel as they finish one (cpu_gemm.h)
  at::parallel_for(0, std::min<int64_t>(tiles, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<uint8_t> wp(nc * kq);
    std::vector<float> wa(nc * ng);
    alignas(64) float acc[kTr][kTm][kLanes];
    float v[kTr * kTm];
    for (int64_t p; (p = next.fetch_add(1)) < tiles;) {
      const int64_t n0 = p * nc, rows = std::min(nc, N - n0);
      const int64_t padded = (rows + kTr - 1) / kTr * kTr;
      decode_panel_int8<BITS>(q, row_bytes, scale, nb, t, K, B, kq, ng, n0, rows, padded,
                              wp.data(), wa.data());
      for (int64_t m0 = 0; m0 < M; m0 += kTm)
        for (int64_t r0 = 0; r0 < padded; r0 += kTr) {
          int8_gemm_tile(wp.data() + r0 * kq, wa.data() + r0 * ng, px, m0, tail, acc, v);
          for (int m = 0; m < kTm && m0 + m < M; ++m)
            for (int r = 0; r < kTr && r0 + r < rows; ++r) {
              const int64_t n = n0 + r0 + r;
              y[(m0 + m) * N + n] = bias ? v[r * kTm + m] + bias[n] : v[r * kTm + m];
            }
        }
    }
  });
}
#endif

// kbit_linear above FUSED_MAX_ROWS rows under int8 activations (block_size a multiple of 32)
at::Tensor kbit_gemm_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                          const at::Tensor& codebook, const c10::optional<at::Tensor>& bias,
                          int64_t bits, int64_t block_size, int64_t in_features) {
#ifdef KBIT_INT8
  const int64_t M = x.size(0), N = qweight.size(0), K = in_features;
  const Int8Tables t = checked_int8_tables(x, qweight, absmax, codebook, bits, block_size, K);
  auto y = at::empty({M, N}, x.options());
  const float* b = bias_ptr(bias, N);
  PackedX8 px;
  pack_x_int8(x.data_ptr<float>(), M, K, t.cfac, px);
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const int64_t nb = absmax.size(1), row_bytes = qweight.size(1);
  with_bits_and_scale(bits, absmax, [&](auto tag, const auto* scale) {
    int8_gemm_panels<decltype(tag)::value>(q, row_bytes, scale, nb, t, K, block_size, px, M, N,
                                           b, y.data_ptr<float>());
  });
  return y;
#else
  return kbit_linear_int8(x, qweight, absmax, codebook, bias, bits, block_size, in_features);
#endif
}
