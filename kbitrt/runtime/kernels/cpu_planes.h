// Bit-plane rows read as stored (bitplane-v1, kbitrt/format/bitplane.py): y = x W^T where the
// K-bit code of a weight is the top K bits of an any-precision parent, K = k_planes an argument
// of each call. planes: uint8 (P, N, ceil(in/8)), plane 0 the code's highest bit; the bit of
// code i of a row in bit (i mod 8) of byte i div 8 of that row of a plane.
//
// AVX-512: the 64 codes of a group come from K 64-bit plane words, one masked byte add per plane
// (the word is the mask: code bytes += 1 << (K-1-p) where the bit is set); AVX2: 16 lanes per
// plane from a broadcast 16-bit word, a variable shift and a mask. The codes then go through the
// same register tables / gathers as the bitslice kernels (lookup16), and the sums run in dot()'s
// fixed order, fused (M = 1) or through a decoded row (M > 1): one token and a batch agree.
//
// Included inside cpu_kernels.cpp's anonymous namespace, after rows_times_x (before
// cpu_layers.h, whose stack linears of kind 3 call kbit_linear_planes).
#pragma once

// code i of a row (p0: the row in plane 0, ps: bytes from one plane to the next)
template <int KP>
inline int plane_code_at(const uint8_t* p0, int64_t ps, int64_t i) {
  int c = 0;
  for (int p = 0; p < KP; ++p) c = (c << 1) | ((p0[p * ps + i / 8] >> (i % 8)) & 1);
  return c;
}

#ifdef KBIT_SIMD
#if KBIT_SIMD == 512
// whole 64s of a row run in "quad order": position 16t + l of a 64 holds code 4l + t, so the
// four groups of 16 codes are the code bytes shifted by 0, 8, 16, 24 bits (no widening, no
// cross-lane shuffle; the table permutes read only the low index bits). x is permuted to match
// once per call (to_quad_order), so sums and decoded rows agree as in natural order.
constexpr bool kQuadOrder = true;

// the 64 codes j..j+63 (j % 64 == 0) as bytes: the plane's 64-bit word loaded as the mask
template <int KP>
inline __m512i plane_bytes64(const uint8_t* p0, int64_t ps, int64_t j) {
  __m512i c = _mm512_setzero_si512();
  for (int p = 0; p < KP; ++p) {
    const __mmask64 w = _load_mask64(reinterpret_cast<__mmask64*>(
        const_cast<uint8_t*>(p0 + p * ps + j / 8)));
    c = _mm512_mask_add_epi8(c, w, c, _mm512_set1_epi8(static_cast<char>(1 << (KP - 1 - p))));
  }
  return c;
}

// the 16 codes j..j+15 (j % 16 == 0) as int32 lanes, in order
template <int KP>
inline vi plane_codes16(const uint8_t* p0, int64_t ps, int64_t j) {
  __m128i c = _mm_setzero_si128();
  for (int p = 0; p < KP; ++p) {
    uint16_t w;
    std::memcpy(&w, p0 + p * ps + j / 8, 2);
    c = _mm_mask_add_epi8(c, static_cast<__mmask16>(w), c,
                          _mm_set1_epi8(static_cast<char>(1 << (KP - 1 - p))));
  }
  return widen(c);
}

// the four groups of 16 codes of j..j+63 as int32 lanes: in order, or in quad order (lane l of
// group t: code 4l + t; the bits above a code are left for 3..6 bits, where the register tables
// read the low 4 / 5 bits and bit 5 for 6 bits, and cleared for the gathers of 7 and 8 bits)
template <int KP, bool QUAD>
inline void plane_codes64(const uint8_t* p0, int64_t ps, int64_t j, vi* out) {
  const __m512i c = plane_bytes64<KP>(p0, ps, j);
  if (!QUAD) {
    out[0] = widen(_mm512_castsi512_si128(c));
    out[1] = widen(_mm512_extracti32x4_epi32(c, 1));
    out[2] = widen(_mm512_extracti32x4_epi32(c, 2));
    out[3] = widen(_mm512_extracti32x4_epi32(c, 3));
    return;
  }
  out[0] = c;
  out[1] = _mm512_srli_epi32(c, 8);
  out[2] = _mm512_srli_epi32(c, 16);
  out[3] = _mm512_srli_epi32(c, 24);
  if (KP >= 7)
    for (int t = 0; t < 3; ++t) out[t] = vand(out[t], 0xFF);
}
#else
constexpr bool kQuadOrder = false;
alignas(64) constexpr int32_t kLane16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

template <int KP>
inline vi plane_codes16(const uint8_t* p0, int64_t ps, int64_t j) {
  vi c{_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int p = 0; p < KP; ++p) {
    uint16_t w;
    std::memcpy(&w, p0 + p * ps + j / 8, 2);
    const __m256i b = _mm256_set1_epi32(w);
    c = vor(c, vsll(vand(vsrlv(vi{b, b}, kLane16), 1), KP - 1 - p));
  }
  return c;
}

template <int KP, bool QUAD>
inline void plane_codes64(const uint8_t* p0, int64_t ps, int64_t j, vi* out) {
  for (int t = 0; t < 4; ++t) out[t] = plane_codes16<KP>(p0, ps, j + 16 * t);
}
#endif

// the values of one row (codebook[code] * scale) in 16s, block by block: emit64(j, 4 x 16) over
// the whole 64s of a block, then emit16(j, 16) over its remaining 16s; B % 16 == 0. With
// B % 64 == 0 the 64s are exactly the whole 64s of the row (dot's order; QUAD only then).
// Returns the first position not covered (K / 16 * 16).
template <int KP, bool QUAD, typename ST, typename E64, typename E16>
inline int64_t plane_row_vectors(const uint8_t* p0, int64_t ps, const ST* scale, const float* cb,
                                 int64_t K, int64_t B, E64 emit64, E16 emit16) {
  const int64_t whole = K / 64 * 64, full = K / 16 * 16;
  vf table[4];
  vi c[4];
  for (int64_t b0 = 0; b0 < full; b0 += B) {
    const vf sv = vset(to_float(scale[b0 / B]));
    make_tables<KP>(cb, sv, table);
    const int64_t end = b0 + B < full ? b0 + B : full;
    int64_t j = b0;
    for (; j + 64 <= end && j + 64 <= whole; j += 64) {
      plane_codes64<KP, QUAD>(p0, ps, j, c);
      emit64(j, lookup16<KP>(c[0], table, cb, sv), lookup16<KP>(c[1], table, cb, sv),
             lookup16<KP>(c[2], table, cb, sv), lookup16<KP>(c[3], table, cb, sv));
    }
    for (; j < end; j += 16)
      emit16(j, lookup16<KP>(plane_codes16<KP>(p0, ps, j), table, cb, sv));
  }
  return full;
}
#else
constexpr bool kQuadOrder = false;
#endif

// x in the order the whole 64s run in (see kQuadOrder), the rest as it is
inline void to_quad_order(const float* x, int64_t K, float* out) {
  const int64_t whole = K / 64 * 64;
  for (int64_t j = 0; j < whole; j += 64)
    for (int t = 0; t < 4; ++t)
      for (int l = 0; l < 16; ++l) out[j + 16 * t + l] = kQuadOrder ? x[j + 4 * l + t] : x[j + 16 * t + l];
  for (int64_t j = whole; j < K; ++j) out[j] = x[j];
}

// a row decoded in that order back in natural order
inline void from_quad_order(const float* w, int64_t K, float* out) {
  const int64_t whole = K / 64 * 64;
  for (int64_t j = 0; j < whole; j += 64)
    for (int t = 0; t < 4; ++t)
      for (int l = 0; l < 16; ++l) (kQuadOrder ? out[j + 4 * l + t] : out[j + 16 * t + l]) = w[j + 16 * t + l];
  for (int64_t j = whole; j < K; ++j) out[j] = w[j];
}

// one row of W (K values) into out: codebook[code] * scale of its block
template <int KP, bool QUAD, typename ST>
void decode_plane_row(const uint8_t* p0, int64_t ps, const ST* scale, const float* cb, int64_t K,
                      int64_t B, float* out) {
  int64_t i = 0;
#ifdef KBIT_SIMD
  if (B % 16 == 0)
    i = plane_row_vectors<KP, QUAD>(
        p0, ps, scale, cb, K, B,
        [out](int64_t j, vf a, vf b, vf c, vf d) {
          vstore(out + j, a), vstore(out + j + 16, b), vstore(out + j + 32, c);
          vstore(out + j + 48, d);
        },
        [out](int64_t j, vf a) { vstore(out + j, a); });
#endif
  for (; i < K; ++i) out[i] = cb[plane_code_at<KP>(p0, ps, i)] * to_float(scale[i / B]);
}

#ifdef KBIT_SIMD
// one row of W times x without a buffer: decode_plane_row + dot's sums, in dot's order
// (B % 64 == 0)
template <int KP, bool QUAD, typename ST>
float plane_row_dot(const uint8_t* p0, int64_t ps, const ST* scale, const float* cb, int64_t K,
                    int64_t B, const float* x) {
  vf acc0 = vzero(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t full = plane_row_vectors<KP, QUAD>(
      p0, ps, scale, cb, K, B,
      [&](int64_t j, vf a, vf b, vf c, vf d) {
        acc0 = vfma(vload(x + j), a, acc0);
        acc1 = vfma(vload(x + j + 16), b, acc1);
        acc2 = vfma(vload(x + j + 32), c, acc2);
        acc3 = vfma(vload(x + j + 48), d, acc3);
      },
      [&](int64_t j, vf a) { acc0 = vfma(vload(x + j), a, acc0); });
  float tail = 0.f;
  for (int64_t i = full; i < K; ++i)
    tail = std::fma(x[i], cb[plane_code_at<KP>(p0, ps, i)] * to_float(scale[i / B]), tail);
  return lanes_sum(acc0, acc1, acc2, acc3) + tail;
}
#endif

// f(std::integral_constant<int, k>) for k in KP..8 (k > 8 runs 8)
template <int KP = 3, typename F>
void for_width(int64_t k, F f) {
  if constexpr (KP < 8) {
    if (k == KP) return f(std::integral_constant<int, KP>{});
    for_width<KP + 1>(k, f);
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// run fn(decode, row_dot, quad) for the call's k_planes and scale dtype (checks the tensors);
// quad: rows decode in quad order (x must be permuted by to_quad_order)
template <typename Fn>
void with_plane_decoder(const at::Tensor& planes, const at::Tensor& absmax,
                        const at::Tensor& codebook, int64_t k_planes, int64_t block_size,
                        int64_t K, Fn fn) {
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.is_contiguous() && planes.dim() == 3 &&
                  planes.size(2) == (K + 7) / 8,
              "kbitrt_cpu: planes must be contiguous uint8 (P, N, ceil(K/8))");
  TORCH_CHECK(k_planes >= 3 && k_planes <= 8 && k_planes <= planes.size(0),
              "kbitrt_cpu: k_planes must be in 3..8 and at most the planes held");
  const int64_t N = planes.size(1), nb = (K + block_size - 1) / block_size;
  const int64_t row_bytes = planes.size(2), ps = N * row_bytes;
  TORCH_CHECK(absmax.is_contiguous() && absmax.dim() == 2 && absmax.size(0) == N &&
                  absmax.size(1) == nb &&
                  (absmax.scalar_type() == at::kHalf || absmax.scalar_type() == at::kFloat),
              "kbitrt_cpu: absmax must be contiguous fp16/fp32 (N, n_blocks)");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.numel() >= (1 << k_planes),
              "kbitrt_cpu: codebook must be fp32 with 2^k_planes entries");
  std::vector<float> cb(256, 0.f);  // padded: every register table and gather stays inside
  const auto cbc = codebook.contiguous();
  std::memcpy(cb.data(), cbc.data_ptr<float>(), sizeof(float) * (1 << k_planes));
  const uint8_t* q = planes.data_ptr<uint8_t>();
  // the vector paths run whole 64s in quad order where blocks are whole 64s (AVX-512)
  const bool quad = kQuadOrder && block_size % 64 == 0;
  auto run = [&](auto tag, const auto* scale) {
    constexpr int KP = decltype(tag)::value;
    const float* c = cb.data();
    auto with_order = [&](auto order) {
      constexpr bool QUAD = decltype(order)::value;
      auto decode = [=](int64_t n, float* out) {
        decode_plane_row<KP, QUAD>(q + n * row_bytes, ps, scale + n * nb, c, K, block_size, out);
      };
#ifdef KBIT_SIMD
      fn(decode, row_dot_fn(block_size % 64 == 0, [=](int64_t n, const float* xr) {
        return plane_row_dot<KP, QUAD>(q + n * row_bytes, ps, scale + n * nb, c, K, block_size,
                                       xr);
      }), QUAD);
#else
      fn(decode, row_dot_fn(false, [](int64_t, const float*) { return 0.f; }), QUAD);
#endif
    };
    if (quad)
      with_order(std::true_type{});
    else
      with_order(std::false_type{});
  };
  auto dispatch = [&](const auto* scale) {
    for_width(k_planes, [&](auto tag) { run(tag, scale); });
  };
  if (absmax.scalar_type() == at::kHalf)
    dispatch(absmax.data_ptr<at::Half>());
  else
    dispatch(absmax.data_ptr<float>());
}

at::Tensor kbit_linear_planes(const at::Tensor& x, const at::Tensor& planes,
                              const at::Tensor& absmax, const at::Tensor& codebook,
                              const c10::optional<at::Tensor>& bias, int64_t k_planes,
                              int64_t block_size, int64_t in_features) {
  check_x(x, in_features);
  const int64_t M = x.size(0), N = planes.size(1), K = in_features;
  auto y = at::empty({M, N}, x.options());
  const float* b = bias_ptr(bias, N);
  with_plane_decoder(planes, absmax, codebook, k_planes, block_size, K,
                     [&](auto decode, auto rd, bool quad) {
    const float* xs = x.data_ptr<float>();
    std::vector<float> xq(quad ? M * K : 0);  // x in the decoded rows' order
    for (int64_t m = 0; quad && m < M; ++m) to_quad_order(xs + m * K, K, xq.data() + m * K);
    if (quad) xs = xq.data();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      rows_times_x(xs, M, K, N, b, y.data_ptr<float>(), n0, n1, decode, rd);
    });
  });
  return y;
}

at::Tensor kbit_dequantize_planes(const at::Tensor& planes, const at::Tensor& absmax,
                                  const at::Tensor& codebook, int64_t k_planes,
                                  int64_t block_size, int64_t in_features) {
  const int64_t N = planes.size(1), K = in_features;
  auto w = at::empty({N, K}, planes.options().dtype(at::kFloat));
  float* out = w.data_ptr<float>();
  with_plane_decoder(planes, absmax, codebook, k_planes, block_size, K,
                     [&](auto decode, auto, bool quad) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> row(quad ? K : 0);
      for (int64_t n = n0; n < n1; ++n) {
        if (!quad) {
          decode(n, out + n * K);
          continue;
        }
        decode(n, row.data());
        from_quad_order(row.data(), K, out + n * K);
      }
    });
  });
  return w;
}
