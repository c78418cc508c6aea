// One decoding token through the whole layer stack in one parallel region (docs/cpu.md, "One
// region per token"). The stack's loops (cpu_layers.h, cpu_rows.h) fork the threads once per
// linear and per attention, ~150 times a SmolLM2 token, and between the forks the main thread
// works alone: norms, quantizing x, the KV write, residual adds, allocating each result, torch's
// dispatch. perf on the 135M step (2 threads, AVX2) had the worker idle 45% of the time. Here the
// threads enter one region per token and meet at barriers: each normalizes and quantizes x for
// itself (a few hundred values: cheaper than waiting), computes its share of each linear's rows,
// adds its rows of the residual, and runs its share of the attention heads and the activation.
// Every value is computed by the same code in the same order as the loops compute it, so the
// logits are bit for bit theirs (tests/test_layer_stack.py).
//
// Served: one token (B = T = 1) under the plain causal mask, sequential residuals with pre-norms,
// every linear packed and on the int8 path (int8_for), an activation torch has an _out op for.
// Anything else runs the loops. Included by cpu_layers.h after cpu_rows.h.
#pragma once

#include <c10/util/ParallelGuard.h>
#ifdef _OPENMP
#include <omp.h>
#endif

std::atomic<bool> g_token_region{true};   // set_token_region: off for the tests' comparisons
std::atomic<int64_t> g_token_region_steps{0};  // steps it served (token_region_steps, for tests)

void set_token_region(bool on) { g_token_region.store(on); }

int64_t token_region_steps() { return g_token_region_steps.load(); }

// whether the stack's configuration and linears fit token_region (checked once, at create)
bool token_region_fits(const StackConfig& c, const std::vector<StackLayer>& layers) {
  if (c.parallel_residual || c.post_norm || c.residual_from_norm || c.act == schema::Act::gelu_new)
    return false;
  for (const StackLayer& layer : layers) {
    // token_region<C> reads every cache as layer 0's type (a mismatch would throw inside it)
    if (layer.k_cache.scalar_type() != layers[0].k_cache.scalar_type()) return false;
    for (const StackLinear& s : layer.lin)
      if (s.kind != schema::LinearKind::absent &&
          (s.kind != schema::LinearKind::packed || !s.int8 ||
           (s.bias.defined() && (s.bias.scalar_type() != at::kFloat || !s.bias.is_contiguous()))))
        return false;
  }
  return !layers.empty();
}

// the int8 path's choice (set_int8_activations) can change between steps
bool token_region_serves(const LayerStack& st, const at::Tensor& x,
                         const std::vector<at::Tensor>& masks) {
  if (!st.token_region || !g_token_region.load() || x.size(0) * x.size(1) != 1) return false;
  for (const at::Tensor& m : masks)
    if (m.numel()) return false;
  for (int64_t bits : st.widths)
    if (!int8_for(bits)) return false;
  return true;
}

// this thread's share of n items in whole `unit`s (the activation's slices start at multiples
// of 64: torch's vector loop then meets every value where it would in one call)
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t unit, int tid, int team) {
  const int64_t units = (n + unit - 1) / unit;
  return {std::min(n, units * tid / team * unit), std::min(n, units * (tid + 1) / team * unit)};
}

// rows n0..n1 (and m0..m1) of y = h W^T (+ bias) for one token, h quantized once into this
// thread's qx
void token_rows(const StackLinear& s, const float* h, QuantX& qx, float* y, int64_t n0,
                int64_t n1, int64_t m0 = 0, int64_t m1 = 0) {
  quantize_for(h, 1, s.in_features, s.bits, s.block, s.int8->cfac, qx);
  const float* bias = s.bias.defined() ? s.bias.data_ptr<float>() : nullptr;
  int8_rows_of(s.w0, s.w1, *s.int8, s.bits, s.block, s.in_features, qx, 1, bias, y, n0, n1);
  if (m1 > m0)
    int8_rows_of(s.w0, s.w1, *s.int8, s.bits, s.block, s.in_features, qx, 1, bias, y, m0, m1);
}

// act(g[a:b]) in place as stack_act computes it (torch's kernel on the slice)
void token_act(schema::Act act, float* g, int64_t a, int64_t b) {
  if (b <= a) return;
  at::Tensor v = at::from_blob(g + a, {b - a}, at::TensorOptions().dtype(at::kFloat));
  switch (act) {
    case schema::Act::silu: at::silu_out(v, v); break;
    case schema::Act::gelu: at::gelu_out(v, v); break;
    case schema::Act::gelu_tanh: at::gelu_out(v, v, "tanh"); break;
    default: at::relu_(v); break;
  }
}

// the step's buffers, shared by the threads: q | k | v outputs, rotated q, attention output,
// the MLP's up (| gate) outputs
struct TokenBuffers {
  std::vector<float> q, k, v, qr, att, o, up, gate;
};

// one layer for the token in xs (D values, updated in place); runs on every thread of the team
template <typename C>
void token_layer(const StackConfig& c, const StackLayer& layer, float* xs, int64_t D,
                 const int64_t* pos, const float* cs, const float* sn, int64_t rd,
                 TokenBuffers& buf, float* h, QuantX& qx, int tid, int team, bool& failed) {
  const StackLinear* lin = layer.lin;
  namespace sl = schema::slot;
  auto rows = [&](int j, const float* in, float* out) {
    const auto [n0, n1] = share(lin[j].w0.size(0), 16, tid, team);
    token_rows(lin[j], in, qx, out, n0, n1);
  };
  auto residual = [&](int j, const float* in) {  // xs += in W^T over this thread's rows
    const auto [n0, n1] = share(D, 16, tid, team);
    token_rows(lin[j], in, qx, buf.o.data(), n0, n1);
    for (int64_t n = n0; n < n1; ++n) xs[n] += buf.o[n];
  };
  norm_into(c, layer.norm1_w, layer.norm1_b, xs, h, D);
  rows(sl::q, h, buf.q.data());
  if (c.qkv == schema::Qkv::separate) rows(sl::k, h, buf.k.data()), rows(sl::v, h, buf.v.data());
  const int64_t S = layer.k_cache.size(2);
  C *kc = layer.k_cache.data_ptr<C>(), *vc = layer.v_cache.data_ptr<C>();
#pragma omp barrier
  if (tid == 0)
    write_kv_rotate_q(c, qkv_views(c, buf.q.data(), buf.k.data(), buf.v.data()), 1, 1, S, cs, sn,
                      rd, pos, kc, vc, buf.qr.data());
#pragma omp barrier
  const auto [i0, i1] = share(c.n_heads, 1, tid, team);
  attend_items(c, 1, 1, S, buf.qr.data(), kc, vc, MaskView{}, pos, pos[0] + 1, buf.att.data(), i0,
               i1);
#pragma omp barrier
  residual(sl::o, buf.att.data());
#pragma omp barrier
  norm_into(c, layer.norm2_w, layer.norm2_b, xs, h, D);
  const int64_t H = lin[sl::down].in_features;
  const auto [a, b] = share(H, 64, tid, team);
  float* g = c.mlp == schema::Mlp::gated ? buf.gate.data() : buf.up.data();
  if (c.mlp == schema::Mlp::gated_fused) {  // rows gate | up: this thread's of each
    token_rows(lin[sl::up], h, qx, g, a, b, H + a, H + b);
  } else {
    token_rows(lin[sl::up], h, qx, buf.up.data(), a, b);
    if (c.mlp == schema::Mlp::gated) token_rows(lin[sl::gate], h, qx, g, a, b);
  }
  try {
    token_act(c.act, g, a, b);
  } catch (const std::exception&) {  // not expected; the caller throws once the region ends
    failed = true;
  }
  const float* u = c.mlp == schema::Mlp::gated_fused ? g + H : buf.up.data();
  if (c.mlp != schema::Mlp::plain)
    for (int64_t i = a; i < b; ++i) g[i] *= u[i];
#pragma omp barrier
  residual(sl::down, g);
#pragma omp barrier
}

// every layer for one token x (1, 1, D) at cache slot pos[0], in one parallel region
template <typename C>
at::Tensor token_region(const LayerStack& st, const at::Tensor& x, const at::Tensor& input_pos,
                        const at::Tensor& cos, const at::Tensor& sin) {
  const StackConfig& c = st.cfg;
  const int64_t D = x.size(-1), heads = c.n_heads * c.head_dim;
  at::Tensor out = x.contiguous().clone();
  float* xs = out.data_ptr<float>();
  const int64_t* pos = input_pos.data_ptr<int64_t>();
  const int64_t rd = cos.numel() ? cos.size(-1) : 0;
  const float *cs = rd ? cos.data_ptr<float>() : nullptr, *sn = rd ? sin.data_ptr<float>() : nullptr;
  auto width = [&](int j) {  // the widest layer's (buffers shared by every layer)
    int64_t w = 0;
    for (const StackLayer& layer : st.layers)
      if (layer.lin[j].kind != schema::LinearKind::absent) w = std::max(w, layer.lin[j].w0.size(0));
    return w;
  };
  namespace sl = schema::slot;
  TokenBuffers buf{std::vector<float>(width(sl::q)), std::vector<float>(width(sl::k)),
                   std::vector<float>(width(sl::v)), std::vector<float>(heads),
                   std::vector<float>(heads), std::vector<float>(D),
                   std::vector<float>(width(sl::up)), std::vector<float>(width(sl::gate))};
  bool failed = false;
#pragma omp parallel
  {
    c10::ParallelGuard guard(true);  // torch ops inside run on this thread alone
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int tid = 0, team = 1;
#endif
    static thread_local QuantX qx;  // this thread's quantized input, reused across steps
    static thread_local std::vector<float> h;
    h.resize(D);
    bool mine = false;
    for (const StackLayer& layer : st.layers)
      token_layer<C>(c, layer, xs, D, pos, cs, sn, rd, buf, h.data(), qx, tid, team, mine);
    if (mine) {
#pragma omp atomic write
      failed = true;
    }
  }
  TORCH_CHECK(!failed, "kbitrt_cpu: the token step's activation failed");
  g_token_region_steps.fetch_add(1);
  return out;
}
