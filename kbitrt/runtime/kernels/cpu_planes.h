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
// the 64 codes j..j+63 (j % 64 == 0) as bytes
template <int KP>
inline __m512i plane_bytes64(const uint8_t* p0, int64_t ps, int64_t j) {
  __m512i c = _mm512_setzero_si512();
  for (int p = 0; p < KP; ++p) {
    uint64_t w;
    std::memcpy(&w, p0 + p * ps + j / 8, 8);
    c = _mm512_mask_add_epi8(c, static_cast<__mmask64>(w), c,
                             _mm512_set1_epi8(static_cast<char>(1 << (KP - 1 - p))));
  }
  return c;
}

// the 16 codes j..j+15 (j % 16 == 0) as int32 lanes
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

// the four groups of 16 codes of j..j+63 as int32 lanes
template <int KP>
inline void plane_codes64(const uint8_t* p0, int64_t ps, int64_t j, vi* out) {
  const __m512i c = plane_bytes64<KP>(p0, ps, j);
  out[0] = widen(_mm512_castsi512_si128(c));
  out[1] = widen(_mm512_extracti32x4_epi32(c, 1));
  out[2] = widen(_mm512_extracti32x4_epi32(c, 2));
  out[3] = widen(_mm512_extracti32x4_epi32(c, 3));
}
#else
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

template <int KP>
inline void plane_codes64(const uint8_t* p0, int64_t ps, int64_t j, vi* out) {
  for (int t = 0; t < 4; ++t) out[t] = plane_codes16<KP>(p0, ps, j + 16 * t);
}
#endif

// the values of one row (codebook[code] * scale) handed to emit(j, 16 values) in 16s over
// whole 64s (emit64) then the remaining 16s (emit16), in order; B % 16 == 0. Returns the
// first position not covered (K / 16 * 16).
template <int KP, typename ST, typename E64, typename E16>
inline int64_t plane_row_vectors(const uint8_t* p0, int64_t ps, const ST* scale, const float* cb,
                                 int64_t K, int64_t B, E64 emit64, E16 emit16) {
  const int64_t whole = K / 64 * 64, full = K / 16 * 16;
  vf table[4];
  int64_t block = -1;
  vf sv = vzero();
  auto value = [&](vi c, int64_t j) {
    if (j / B != block) {
      block = j / B;
      sv = vset(to_float(scale[block]));
      make_tables<KP>(cb, sv, table);
    }
    return lookup16<KP>(c, table, cb, sv);
  };
  vi c[4];
  for (int64_t j = 0; j < whole; j += 64) {
    plane_codes64<KP>(p0, ps, j, c);
    emit64(j, value(c[0], j), value(c[1], j + 16), value(c[2], j + 32), value(c[3], j + 48));
  }
  for (int64_t j = whole; j < full; j += 16) emit16(j, value(plane_codes16<KP>(p0, ps, j), j));
  return full;
}
#endif

// one row of W (K values) into out: codebook[code] * scale of its block
template <int KP, typename ST>
void decode_plane_row(const uint8_t* p0, int64_t ps, const ST* scale, const float* cb, int64_t K,
                      int64_t B, float* out) {
  int64_t i = 0;
#ifdef KBIT_SIMD
  if (B % 16 == 0)
    i = plane_row_vectors<KP>(
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
template <int KP, typename ST>
float plane_row_dot(const uint8_t* p0, int64_t ps, const ST* scale, const float* cb, int64_t K,
                    int64_t B, const float* x) {
  vf acc0 = vzero(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t full = plane_row_vectors<KP>(
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

// run fn(decode, row_dot) for the call's k_planes and scale dtype (checks the tensors)
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
  auto run = [&](auto tag, const auto* scale) {
    constexpr int KP = decltype(tag)::value;
    const float* c = cb.data();
    auto decode = [=](int64_t n, float* out) {
      decode_plane_row<KP>(q + n * row_bytes, ps, scale + n * nb, c, K, block_size, out);
    };
#ifdef KBIT_SIMD
    fn(decode, row_dot_fn(block_size % 16 == 0, [=](int64_t n, const float* xr) {
      return plane_row_dot<KP>(q + n * row_bytes, ps, scale + n * nb, c, K, block_size, xr);
    }));
#else
    fn(decode, row_dot_fn(false, [](int64_t, const float*) { return 0.f; }));
#endif
  };
  auto dispatch = [&](const auto* scale) {
    switch (k_planes) {
      case 3: run(std::integral_constant<int, 3>{}, scale); break;
      case 4: run(std::integral_constant<int, 4>{}, scale); break;
      case 5: run(std::integral_constant<int, 5>{}, scale); break;
      case 6: run(std::integral_constant<int, 6>{}, scale); break;
      case 7: run(std::integral_constant<int, 7>{}, scale); break;
      default: run(std::integral_constant<int, 8>{}, scale); break;
    }
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
                     [&](auto decode, auto rd) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      rows_times_x(x.data_ptr<float>(), M, K, N, b, y.data_ptr<float>(), n0, n1, decode, rd);
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
  with_plane_decoder(planes, absmax, codebook, k_planes, block_size, K, [&](auto decode, auto) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) decode(n, out + n * K);
    });
  });
  return w;
}
