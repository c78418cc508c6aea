// A decoder's whole stack of layers in one call (docs/cpu.md, "One call per step"). On a small
// model a CPU decoding step is dispatch-bound: run layer by layer from Python it is ~1,600 torch
// calls, each costing microseconds of interpreter and dispatch, around 121 kernel calls that do
// the work. Here the layers run from C++ and the linears call the fused kernels directly. Steps
// of up to fused_max_rows tokens (decoding) do the rest as loops over rows (cpu_rows.h); longer
// ones (prefill) run the same torch ops, in the same order with the same arguments, as
// models/decoder.py (Block, Attention, MLP, KVCache.update, KbitLinear): bit-identical to the
// Python layers there (tests/test_layer_stack.py).
//
// Included inside cpu_kernels.cpp's anonymous namespace, after kbit_linear and kbit_dequantize.
// The Python side (models/layer_stack.py) registers a model's tensors once per KV cache
// (layer_stack_create -> a handle) and calls layer_stack_forward at every step.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <type_traits>

// one linear of the stack; kind 0: absent, 1: packed k-bit codes (w0 qweight, w1 absmax, w2
// codebook, bias fp32), 2: a dense weight w0 and its bias as the module holds them, 3: bit planes
// (cpu_planes.h: w0 the planes (P, N, ceil(K/8)) of which the first `bits` are read, w1 absmax,
// w2 the width's codebook, bias fp32)
struct StackLinear {
  int64_t kind = 0, bits = 0, block = 0, in_features = 0;
  at::Tensor w0, w1, w2, bias;
};

// the per-layer slots: q (or the stacked q|k|v), k, v, o, up (or the stacked gate|up), gate, down
enum { kQ, kK, kV, kO, kUp, kGate, kDown, kLinears };

struct StackLayer {
  at::Tensor norm1_w, norm1_b, norm2_w, norm2_b, k_cache, v_cache;
  StackLinear lin[kLinears];
  int64_t mask_index = 0;
};

// model switches, the ModelArgs fields of the same names (models/families.py)
struct StackConfig {
  int64_t n_heads, n_kv_heads, head_dim;
  int64_t norm;  // 0 rmsnorm, 1 layernorm
  int64_t act;   // 0 silu, 1 gelu, 2 gelu (tanh), 3 relu, 4 gelu_new
  int64_t qkv;   // 0 separate, 1 fused (q|k|v rows), 2 interleaved (per head q, k, v)
  int64_t mlp;   // 0 plain, 1 gated, 2 gated with gate|up stacked
  bool parallel_residual, post_norm, residual_from_norm;
  int64_t fused_max_rows;  // kernels/cpu.py FUSED_MAX_ROWS: above, dequantize + torch matmul
  bool enable_gqa;
  double eps;
};

struct LayerStack {
  StackConfig cfg;
  std::vector<StackLayer> layers;
  bool rows_ok = true;  // norms in fp32, caches in fp32 or 16 bits (cpu_rows.h's path can run)
};

std::mutex g_stacks_mutex;
std::map<int64_t, std::shared_ptr<const LayerStack>> g_stacks;
int64_t g_next_stack = 1;

// whether every defined tensor is contiguous fp32
bool all_float(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->defined() && (t->scalar_type() != at::kFloat || !t->is_contiguous())) return false;
  return true;
}

constexpr int64_t kHeaderInts = 12, kTensorsPerLayer = 6 + 4 * kLinears;

// config: the StackConfig integers, then per layer its mask index and (kind, bits, block,
// in_features) per linear; tensors: per layer the two norms' weight and bias, the k and v caches
// and (w0, w1, w2, bias) per linear, an empty tensor where there is none
int64_t layer_stack_create(const std::vector<at::Tensor>& tensors,
                           const std::vector<int64_t>& config, double eps) {
  TORCH_CHECK(config.size() >= kHeaderInts, "kbitrt_cpu: layer stack config too short");
  const int64_t n_layers = config[0];
  TORCH_CHECK(static_cast<int64_t>(config.size()) == kHeaderInts + n_layers * (1 + 4 * kLinears) &&
                  static_cast<int64_t>(tensors.size()) == n_layers * kTensorsPerLayer,
              "kbitrt_cpu: layer stack config and tensors do not match ", n_layers, " layers");
  auto stack = std::make_shared<LayerStack>();
  const int64_t* c = config.data() + 1;
  stack->cfg = StackConfig{c[0], c[1], c[2], c[3], c[4], c[5], c[6],
                           c[7] != 0, c[8] != 0, c[9] != 0, c[10], false, eps};
  stack->cfg.enable_gqa = stack->cfg.n_kv_heads != stack->cfg.n_heads;
  auto opt = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* li = config.data() + kHeaderInts + l * (1 + 4 * kLinears);
    const at::Tensor* t = tensors.data() + l * kTensorsPerLayer;
    StackLayer layer;
    layer.norm1_w = opt(t[0]), layer.norm1_b = opt(t[1]);
    layer.norm2_w = opt(t[2]), layer.norm2_b = opt(t[3]);
    layer.k_cache = t[4], layer.v_cache = t[5];
    layer.mask_index = li[0];
    for (int j = 0; j < kLinears; ++j) {
      StackLinear& s = layer.lin[j];
      s.kind = li[1 + 4 * j], s.bits = li[2 + 4 * j], s.block = li[3 + 4 * j];
      s.in_features = li[4 + 4 * j];
      s.w0 = opt(t[6 + 4 * j]), s.w1 = opt(t[7 + 4 * j]), s.w2 = opt(t[8 + 4 * j]);
      s.bias = opt(t[9 + 4 * j]);
      TORCH_CHECK(s.kind == 0 || s.w0.defined(), "kbitrt_cpu: layer ", l, " linear ", j,
                  " has no weight");
    }
    const at::ScalarType kv = layer.k_cache.scalar_type();
    stack->rows_ok = stack->rows_ok &&
                     all_float({&layer.norm1_w, &layer.norm1_b, &layer.norm2_w, &layer.norm2_b}) &&
                     (kv == at::kFloat || kv == at::kHalf || kv == at::kBFloat16) &&
                     layer.v_cache.scalar_type() == kv && layer.k_cache.is_contiguous() &&
                     layer.v_cache.is_contiguous();
    stack->layers.push_back(std::move(layer));
  }
  std::lock_guard<std::mutex> lock(g_stacks_mutex);
  g_stacks[g_next_stack] = std::move(stack);
  return g_next_stack++;
}

void layer_stack_free(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_stacks_mutex);
  g_stacks.erase(handle);
}

// whether decoding steps can take cpu_rows.h's loops (else torch's ops run between the linears)
bool layer_stack_loops(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_stacks_mutex);
  auto it = g_stacks.find(handle);
  TORCH_CHECK(it != g_stacks.end(), "kbitrt_cpu: no layer stack ", handle);
  return it->second->rows_ok;
}

// cpu.half_linear (kernels/cpu.py): the fused loop up to fused_max_rows tokens, above fp32
// copies of at most kHeadChunk rows of W at a time
constexpr int64_t kHeadChunk = 4096;  // cpu.py's _HEAD_CHUNK

at::Tensor stack_half_linear(const at::Tensor& w, const at::Tensor& bias, int64_t fused_max_rows,
                             const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const at::Tensor x2 = x.reshape({-1, w.size(1)}).contiguous();
  const at::Tensor b = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y;
  if (x2.size(0) <= fused_max_rows) {
    y = half_linear(x2, w, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt);
  } else {
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < w.size(0); i += kHeadChunk) {
      const int64_t j = std::min(w.size(0), i + kHeadChunk);
      parts.push_back(at::linear(x2, w.slice(0, i, j).to(at::kFloat),
                                 b.defined() ? b.slice(0, i, j) : at::Tensor()));
    }
    y = at::cat(parts, -1);
  }
  shape.back() = w.size(0);
  return y.reshape(shape);
}

// KbitLinear.forward (linear.py) and, for dense weights, its dense_linear / nn.Linear
at::Tensor stack_linear(const StackLinear& s, int64_t fused_max_rows, const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (s.kind == 2) {
    const at::Tensor& w = s.w0;
    if (x.scalar_type() == w.scalar_type())
      return at::linear(x, w, s.bias.defined() ? s.bias.to(w.scalar_type()) : at::Tensor());
    if (x.scalar_type() == at::kFloat &&
        (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16)) {
      // a 16-bit copy under fp32 activations, as dense_linear: fp32 products and sums
      return stack_half_linear(w, s.bias, fused_max_rows, x);
    }
    at::Tensor y = at::linear(x.to(w.scalar_type()), w).to(x.scalar_type());
    return s.bias.defined() ? y + s.bias.to(x.scalar_type()) : y;
  }
  const at::Tensor x2 = x.reshape({-1, s.in_features}).to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> bias =
      s.bias.defined() ? c10::optional<at::Tensor>(s.bias) : c10::nullopt;
  at::Tensor y;
  if (s.kind == 3) {  // bit planes (cpu_planes.h): w0 the planes, the first `bits` read
    y = x2.size(0) <= fused_max_rows
            ? kbit_linear_planes(x2, s.w0, s.w1, s.w2, bias, s.bits, s.block, s.in_features)
            : at::linear(x2, kbit_dequantize_planes(s.w0, s.w1, s.w2, s.bits, s.block,
                                                    s.in_features), s.bias);
  } else {  // above fused_max_rows the op runs its prefill GEMM (cpu_gemm.h), as cpu.py's
    y = kbit_linear(x2, s.w0, s.w1, s.w2, bias, s.bits, s.block, s.in_features);
  }
  shape.back() = y.size(1);
  return y.reshape(shape).to(x.scalar_type());
}

at::Tensor stack_norm(const StackConfig& cfg, const at::Tensor& w, const at::Tensor& b,
                      const at::Tensor& x) {
  if (cfg.norm == 0) return at::rms_norm(x, {w.size(0)}, w, cfg.eps);
  return at::layer_norm(x, {w.size(0)}, w, b.defined() ? b : at::Tensor(), cfg.eps, true);
}

at::Tensor rotate_half(const at::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// apply_rotary (decoder.py): the first rd dims of each head rotated
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t rd = cos.size(-1);
  if (rd == x.size(-1)) return x * cos + rotate_half(x) * sin;
  at::Tensor rot = x.slice(-1, 0, rd), rest = x.slice(-1, rd);
  rot = rot * cos + rotate_half(rot) * sin;
  return rest.size(-1) ? at::cat({rot, rest}, -1) : rot;
}

at::Tensor stack_attention(const StackConfig& c, const StackLayer& layer, const at::Tensor& x,
                           const at::Tensor& input_pos, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& mask) {
  const int64_t B = x.size(0), T = x.size(1), nh = c.n_heads, nkv = c.n_kv_heads,
                hd = c.head_dim;
  auto lin = [&](int j, const at::Tensor& h) {
    return stack_linear(layer.lin[j], c.fused_max_rows, h);
  };
  at::Tensor q, k, v;
  if (c.qkv == 0) {
    q = lin(kQ, x), k = lin(kK, x), v = lin(kV, x);
  } else if (c.qkv == 1) {
    auto parts = lin(kQ, x).split_with_sizes({nh * hd, nkv * hd, nkv * hd}, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    auto parts = lin(kQ, x).view({B, T, nh, 3, hd}).unbind(3);
    q = parts[0], k = parts[1], v = parts[2];
  }
  q = q.reshape({B, T, nh, hd}).transpose(1, 2);
  k = k.reshape({B, T, nkv, hd}).transpose(1, 2);
  v = v.reshape({B, T, nkv, hd}).transpose(1, 2);
  if (cos.numel()) q = apply_rotary(q, cos, sin), k = apply_rotary(k, cos, sin);
  layer.k_cache.index_copy_(2, input_pos, k.to(layer.k_cache.scalar_type()));
  layer.v_cache.index_copy_(2, input_pos, v.to(layer.v_cache.scalar_type()));
  // a 16-bit cache is read widened to the activations' dtype (kv_cache.py KVCache.update)
  const at::Tensor y = at::scaled_dot_product_attention(
      q, layer.k_cache.to(q.scalar_type()), layer.v_cache.to(q.scalar_type()), mask, 0.0, false,
      c10::nullopt, c.enable_gqa);
  return lin(kO, y.transpose(1, 2).reshape({B, T, -1}));
}

at::Tensor stack_act(const StackConfig& c, const at::Tensor& x) {
  switch (c.act) {
    case 0: return at::silu(x);
    case 1: return at::gelu(x);
    case 2: return at::gelu(x, "tanh");
    case 3: return at::relu(x);
    default: {  // GPT-2's gelu_new: transformers' NewGELUActivation formula, op by op
      const at::Tensor inner = (x + at::pow(x, 3.0) * 0.044715) * std::sqrt(2.0 / M_PI);
      return x * 0.5 * (at::tanh(inner) + 1.0);
    }
  }
}

at::Tensor stack_mlp(const StackConfig& c, const StackLayer& layer, const at::Tensor& x) {
  auto lin = [&](int j, const at::Tensor& h) {
    return stack_linear(layer.lin[j], c.fused_max_rows, h);
  };
  if (c.mlp == 2) {
    auto gu = lin(kUp, x).chunk(2, -1);
    return lin(kDown, stack_act(c, gu[0]) * gu[1]);
  }
  if (c.mlp == 1)
    return lin(kDown, stack_act(c, lin(kGate, x)) * lin(kUp, x));
  return lin(kDown, stack_act(c, lin(kUp, x)));
}

#include "cpu_rows.h"

// Block.forward; `rows`: the decoding path of cpu_rows.h between the linears
at::Tensor stack_block(const StackConfig& c, const StackLayer& layer, at::Tensor x,
                       const at::Tensor& input_pos, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& mask, bool rows) {
  auto norm = [&](const at::Tensor& w, const at::Tensor& b, const at::Tensor& h) {
    return rows ? norm_rows(c, w, b, h) : stack_norm(c, w, b, h);
  };
  auto norm1 = [&](const at::Tensor& h) { return norm(layer.norm1_w, layer.norm1_b, h); };
  auto norm2 = [&](const at::Tensor& h) { return norm(layer.norm2_w, layer.norm2_b, h); };
  auto attention = [&](const at::Tensor& h) {
    if (!rows) return stack_attention(c, layer, h, input_pos, cos, sin, mask);
    switch (layer.k_cache.scalar_type()) {
      case at::kHalf: return attention_rows<at::Half>(c, layer, h, input_pos, cos, sin, mask);
      case at::kBFloat16:
        return attention_rows<at::BFloat16>(c, layer, h, input_pos, cos, sin, mask);
      default: return attention_rows<float>(c, layer, h, input_pos, cos, sin, mask);
    }
  };
  auto mlp = [&](const at::Tensor& h) {
    return rows ? mlp_rows(c, layer, h) : stack_mlp(c, layer, h);
  };
  auto add = [&](const at::Tensor& a, const at::Tensor& b) { return rows ? add_rows(a, b) : a + b; };
  if (c.parallel_residual) {
    const at::Tensor a = attention(norm1(x));
    return add(add(x, a), mlp(norm2(x)));
  }
  at::Tensor h = c.post_norm ? x : norm1(x);
  x = add(c.residual_from_norm ? h : x, attention(h));
  if (c.post_norm) x = norm1(x);
  h = c.post_norm ? x : norm2(x);
  x = add(c.residual_from_norm ? h : x, mlp(h));
  return c.post_norm ? norm2(x) : x;
}

// every layer for x (B, T, dim) at cache slots input_pos (T,); cos, sin (B, 1, T, rd) or empty
// (no rotary positions); masks: the additive masks the layers' mask indices name
at::Tensor layer_stack_forward(int64_t handle, const at::Tensor& x, const at::Tensor& input_pos,
                               const at::Tensor& cos, const at::Tensor& sin,
                               const std::vector<at::Tensor>& masks) {
  std::shared_ptr<const LayerStack> stack;
  {
    std::lock_guard<std::mutex> lock(g_stacks_mutex);
    auto it = g_stacks.find(handle);
    TORCH_CHECK(it != g_stacks.end(), "kbitrt_cpu: no layer stack ", handle);
    stack = it->second;
  }
  // the loops' path: a decoding step's few rows, everything fp32 and contiguous
  bool rows = stack->rows_ok && x.size(1) <= stack->cfg.fused_max_rows &&
              input_pos.scalar_type() == at::kLong && input_pos.is_contiguous() &&
              all_float({&x, &cos, &sin});
  for (const at::Tensor& m : masks)
    rows = rows && all_float({&m}) && m.size(-1) == stack->layers[0].k_cache.size(2);
  at::Tensor h = x;
  for (const StackLayer& layer : stack->layers) {
    TORCH_CHECK(layer.mask_index < static_cast<int64_t>(masks.size()),
                "kbitrt_cpu: a layer's mask is missing");
    h = stack_block(stack->cfg, layer, h, input_pos, cos, sin, masks[layer.mask_index], rows);
  }
  return h;
}
