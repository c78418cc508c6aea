// The layer stack's one path (cpu_layers.h): for up to fused_max_rows tokens with fp32
// activations (a longer step runs the Python layers), the work between the linears (norms,
// rotary, the KV cache write, attention, the gated product, residual adds) as plain loops over
// rows instead of ~180 small torch ops per layer, each microseconds of dispatch and allocation.
// Sums run in fixed orders within a row, so a token's result does not depend on how many tokens
// the step holds (like the kernels): one token at a time and a k-token verifying step agree bit
// for bit. Against the Python layers (torch ops) the results agree to rounding
// (tests/test_layer_stack.py).
//
// Included by cpu_layers.h after stack_linear and stack_act.
#pragma once

// one row y = norm(x) of D values
void norm_into(const StackConfig& c, const at::Tensor& w, const at::Tensor& b, const float* xr,
               float* yr, int64_t D) {
  const float* ws = w.data_ptr<float>();
  const float* bs = b.defined() ? b.data_ptr<float>() : nullptr;
  const float eps = static_cast<float>(c.eps);
  if (c.norm == schema::Norm::rmsnorm) {
    const float inv = 1.f / std::sqrt(dot(xr, xr, D) / D + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * ws[i];
    return;
  }
  float mean = 0.f, var = 0.f;
  for (int64_t i = 0; i < D; ++i) mean += xr[i];
  mean /= D;
  for (int64_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
  const float inv = 1.f / std::sqrt(var / D + eps);
  for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mean) * inv * ws[i] + (bs ? bs[i] : 0.f);
}

// y = norm(x) over the last dim, a new tensor (x contiguous fp32)
at::Tensor norm_rows(const StackConfig& c, const at::Tensor& w, const at::Tensor& b,
                     const at::Tensor& x) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  at::Tensor y = at::empty_like(x);
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) norm_into(c, w, b, xs + r * D, ys + r * D, D);
  return y;
}

at::Tensor add_rows(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor y = at::empty_like(a);
  const float *as = a.data_ptr<float>(), *bs = b.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) ys[i] = as[i] + bs[i];
  return y;
}

// where q, k or v of token row bt, head h sits in a linear's output
struct HeadView {
  const float* base;
  int64_t row, head, offset;
  const float* at(int64_t bt, int64_t h) const { return base + bt * row + h * head + offset; }
};

// rotary over the first rd dims of one head (decoder.py apply_rotary), the rest copied; into an
// fp32 row or a 16-bit cache's (each value rounded once to nearest even, as torch's .to does)
template <typename D>
inline void rotate_into(const float* src, const float* cs, const float* sn, int64_t rd,
                        int64_t hd, D* dst) {
  const int64_t half = rd / 2;
  for (int64_t i = 0; i < half; ++i) dst[i] = D(src[i] * cs[i] - src[i + half] * sn[i]);
  for (int64_t i = half; i < rd; ++i) dst[i] = D(src[i] * cs[i] + src[i - half] * sn[i]);
  for (int64_t i = rd; i < hd; ++i) dst[i] = D(src[i]);
}

// n cached values as fp32 (exact): a 16-bit cache is widened into `buf`, an fp32 one read in place
inline const float* cache_floats(const float* src, int64_t, float*) { return src; }
template <typename C>
inline const float* cache_floats(const C* src, int64_t n, float* buf) {
  int64_t i = 0;
#ifdef KBIT_SIMD
  for (; i + 16 <= n; i += 16) vstore(buf + i, load16(src + i));
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// where a step's q, k and v sit in the q/k/v linears' outputs (separate, fused or per head)
struct QkvViews {
  HeadView q, k, v;
};

QkvViews qkv_views(const StackConfig& c, const float* q, const float* k, const float* v) {
  const int64_t nh = c.n_heads, nkv = c.n_kv_heads, hd = c.head_dim;
  if (c.qkv == schema::Qkv::separate)
    return {{q, nh * hd, hd, 0}, {k, nkv * hd, hd, 0}, {v, nkv * hd, hd, 0}};
  if (c.qkv == schema::Qkv::fused) {  // rows q | k | v
    const int64_t W = (nh + 2 * nkv) * hd;
    return {{q, W, hd, 0}, {q, W, hd, nh * hd}, {q, W, hd, (nh + nkv) * hd}};
  }
  const int64_t W = 3 * nh * hd;  // per head q, k, v
  return {{q, W, 3 * hd, 0}, {q, W, 3 * hd, hd}, {q, W, 3 * hd, 2 * hd}};
}

// rotary on k and q; k and v into the caches at slots pos, q (rotated) into q_out (B, T, nh, hd)
template <typename C>
void write_kv_rotate_q(const StackConfig& c, const QkvViews& in, int64_t B, int64_t T, int64_t S,
                       const float* cs, const float* sn, int64_t rd, const int64_t* pos, C* kc,
                       C* vc, float* q_out) {
  const int64_t nh = c.n_heads, nkv = c.n_kv_heads, hd = c.head_dim;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t bt = b * T + t;
      const float *cr = rd ? cs + bt * rd : nullptr, *sr = rd ? sn + bt * rd : nullptr;
      for (int64_t g = 0; g < nkv; ++g) {
        C* kd = kc + ((b * nkv + g) * S + pos[t]) * hd;
        rotate_into(in.k.at(bt, g), cr, sr, rd, hd, kd);  // rd = 0: copied
        rotate_into(in.v.at(bt, g), nullptr, nullptr, 0, hd, vc + ((b * nkv + g) * S + pos[t]) * hd);
      }
      for (int64_t h = 0; h < nh; ++h) {
        float* qd = q_out + (bt * nh + h) * hd;
        if (rd) rotate_into(in.q.at(bt, h), cr, sr, rd, hd, qd);
        else std::memcpy(qd, in.q.at(bt, h), sizeof(float) * hd);
      }
    }
}

// the additive mask (B, 1 or nh, T, S) as attend_items reads it; none (causal): the slots up to
// each token's position
struct MaskView {
  const float* m = nullptr;  // nullptr: causal, implied by the positions
  int64_t b = 0, h = 0, t = 0;
};

MaskView mask_view(const at::Tensor& mask) {
  if (mask.numel() == 0) return {};
  return {mask.data_ptr<float>(), mask.stride(0), mask.size(1) == 1 ? 0 : mask.stride(1),
          mask.stride(2)};
}

// slots after the last one any mask row leaves open (the causal mask hides the cache's future)
// are neither widened nor looped over: they would add exp(-inf) = 0, the same sums
int64_t live_slots(const MaskView& mv, int64_t B, int64_t nh, int64_t T, int64_t S,
                   const int64_t* pos) {
  int64_t live = 0;
  for (int64_t t = 0; !mv.m && t < T; ++t) live = std::max(live, pos[t] + 1);
  for (int64_t b = 0; mv.m && b < B; ++b)
    for (int64_t h = 0; h < (mv.h ? nh : 1); ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* mrow = mv.m + b * mv.b + h * mv.h + t * mv.t;
        for (int64_t s = S - 1; s >= live; --s)
          if (mrow[s] != -INFINITY) {
            live = s + 1;
            break;
          }
      }
  return live;
}

// softmax attention for items i0..i1 (in order: batch row, head, token) of q (B, T, nh, hd) over
// the caches' first `live` slots, into ys (B, T, nh * hd)
template <typename C>
void attend_items(const StackConfig& c, int64_t B, int64_t T, int64_t S, const float* q,
                  const C* kc, const C* vc, const MaskView& mv, const int64_t* pos, int64_t live,
                  float* ys, int64_t i0, int64_t i1) {
  const int64_t nh = c.n_heads, nkv = c.n_kv_heads, hd = c.head_dim, group = nh / nkv;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  static thread_local std::vector<float> p;
  p.resize(std::max<size_t>(p.size(), live));
  // a 16-bit cache's head group widened once per run of items that share it (a group's heads
  // are neighbours), into buffers each thread keeps
  static thread_local std::vector<float> kbuf, vbuf;
  if (!std::is_same<C, float>::value && kbuf.size() < static_cast<size_t>(live * hd))
    kbuf.resize(live * hd), vbuf.resize(live * hd);
  int64_t widened = -1;
  const float *kg = nullptr, *vg = nullptr;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / (nh * T), h = i / T % nh, t = i % T, g = h / group;
    const float* qi = q + ((b * T + t) * nh + h) * hd;
    const float* mrow = mv.m ? mv.m + b * mv.b + h * mv.h + t * mv.t : nullptr;
    const int64_t seen = mv.m ? live : pos[t] + 1;  // slots from here on are masked
    if (b * nkv + g != widened) {
      widened = b * nkv + g;
      kg = cache_floats(kc + widened * S * hd, live * hd, kbuf.data());
      vg = cache_floats(vc + widened * S * hd, live * hd, vbuf.data());
    }
    float top = -INFINITY;
    for (int64_t s = 0; s < live; ++s) {
      if (!mv.m)
        p[s] = s < seen ? dot(qi, kg + s * hd, hd) * scale : -INFINITY;
      else
        p[s] = mrow[s] == -INFINITY ? -INFINITY : dot(qi, kg + s * hd, hd) * scale + mrow[s];
      top = p[s] > top ? p[s] : top;
    }
    float total = 0.f;
    for (int64_t s = 0; s < live; ++s)
      total += p[s] = p[s] == -INFINITY ? 0.f : std::exp(p[s] - top);
    float* yi = ys + (b * T + t) * nh * hd + h * hd;
    std::fill(yi, yi + hd, 0.f);
    for (int64_t s = 0; s < live; ++s) {
      if (p[s] == 0.f) continue;
      const float ps = p[s] / total;
      const float* vs = vg + s * hd;
      for (int64_t d = 0; d < hd; ++d) yi[d] += ps * vs[d];
    }
  }
}

// Attention.forward: the q/k/v linears, rotary, k and v into the cache at input_pos, softmax
// attention over the cache under the additive mask (B, 1 or nh, T, S; an empty one: causal with
// no padding, implied by the positions: token t sees the slots up to pos[t], so
// runtime/layer_stack.py need not build the masks every step), then the output linear.
// C: the caches' element type (float, or at::Half / at::BFloat16 for a 16-bit cache)
template <typename C>
at::Tensor attention_rows(const StackConfig& c, const StackLayer& layer, const at::Tensor& x,
                          const at::Tensor& input_pos, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& mask) {
  const int64_t B = x.size(0), T = x.size(1), nh = c.n_heads, hd = c.head_dim,
                S = layer.k_cache.size(2);
  auto lin = [&](int j, const at::Tensor& h) {
    return stack_linear(layer.lin[j], c.fused_max_rows, h).contiguous();
  };
  const at::Tensor qo = lin(schema::slot::q, x);
  at::Tensor ko, vo;
  if (c.qkv == schema::Qkv::separate) ko = lin(schema::slot::k, x), vo = lin(schema::slot::v, x);
  const QkvViews views = qkv_views(c, qo.data_ptr<float>(),
                                   ko.defined() ? ko.data_ptr<float>() : nullptr,
                                   vo.defined() ? vo.data_ptr<float>() : nullptr);
  const int64_t rd = cos.numel() ? cos.size(-1) : 0;
  const float *cs = rd ? cos.data_ptr<float>() : nullptr, *sn = rd ? sin.data_ptr<float>() : nullptr;
  const int64_t* pos = input_pos.data_ptr<int64_t>();
  C *kc = layer.k_cache.data_ptr<C>(), *vc = layer.v_cache.data_ptr<C>();
  std::vector<float> q(B * T * nh * hd);
  write_kv_rotate_q(c, views, B, T, S, cs, sn, rd, pos, kc, vc, q.data());
  at::Tensor y = at::empty({B, T, nh * hd}, x.options());
  const MaskView mv = mask_view(mask);
  const int64_t live = live_slots(mv, B, nh, T, S, pos);
  at::parallel_for(0, B * nh * T, 1, [&](int64_t i0, int64_t i1) {
    attend_items(c, B, T, S, q.data(), kc, vc, mv, pos, live, y.data_ptr<float>(), i0, i1);
  });
  return stack_linear(layer.lin[schema::slot::o], c.fused_max_rows, y);
}

// MLP.forward: the activation is torch's (vectorized exp), the product a loop
at::Tensor mlp_rows(const StackConfig& c, const StackLayer& layer, const at::Tensor& x) {
  auto lin = [&](int j, const at::Tensor& h) {
    return stack_linear(layer.lin[j], c.fused_max_rows, h);
  };
  if (c.mlp == schema::Mlp::plain)
    return lin(schema::slot::down, stack_act(c, lin(schema::slot::up, x)));
  at::Tensor g, u;
  if (c.mlp == schema::Mlp::gated_fused) {
    const at::Tensor gu = lin(schema::slot::up, x);
    const int64_t H = gu.size(-1) / 2;
    g = stack_act(c, gu.narrow(-1, 0, H)).contiguous(), u = gu.narrow(-1, H, H);
  } else {
    g = stack_act(c, lin(schema::slot::gate, x)).contiguous(), u = lin(schema::slot::up, x);
  }
  const int64_t H = g.size(-1), rows = g.numel() / H, us = u.stride(-2);
  float* gs = g.data_ptr<float>();
  const float* uu = u.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < H; ++i) gs[r * H + i] *= uu[r * us + i];
  return lin(schema::slot::down, g);
}
