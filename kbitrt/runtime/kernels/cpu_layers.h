// A decoder's whole stack of layers in one call (docs/cpu.md, "One call per step"). On a small
// model a CPU decoding step is dispatch-bound: run layer by layer from Python it is ~1,600 torch
// calls, each costing microseconds of interpreter and dispatch, around 121 kernel calls that do
// the work. Here the layers run from C++: the linears call the fused kernels directly and the
// rest runs as loops over rows (cpu_rows.h), one path. A step the loops do not serve (more than
// fused_max_rows tokens: a prefill; activations, masks or positions not fp32/int64 contiguous)
// comes back empty and runs model/decoder.py's Python layers instead.
//
// Included inside cpu_kernels.cpp's anonymous namespace, after kbit_linear and kbit_dequantize.
// The Python side (runtime/layer_stack.py) registers a model's tensors once per KV cache
// (layer_stack_create -> a handle) and calls layer_stack_forward at every step. What the
// create call's ints and tensors hold is cpu_schema.h, generated from cpu_schema.py.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <type_traits>

#include "cpu_schema.h"

// one linear of the stack (schema StackLinear; schema::LinearKind says what w0..w2 hold)
struct StackLinear {
  schema::LinearKind kind = schema::LinearKind::absent;
  int64_t bits = 0, block = 0, in_features = 0;
  at::Tensor w0, w1, w2, bias;
  std::shared_ptr<const Int8Tables> int8;  // packed, blocks of 32k: the int8 path's tables
};

struct StackLayer {
  at::Tensor norm1_w, norm1_b, norm2_w, norm2_b, k_cache, v_cache;
  StackLinear lin[schema::slot::count];
  int64_t mask_index = 0;
};

// model switches (schema StackConfig: the ModelArgs fields of the same names)
struct StackConfig {
  int64_t n_heads, n_kv_heads, head_dim;
  schema::Norm norm;
  schema::Act act;
  schema::Qkv qkv;
  schema::Mlp mlp;
  bool parallel_residual, post_norm, residual_from_norm;
  int64_t fused_max_rows;  // kernels/cpu.py FUSED_MAX_ROWS: above, the op's prefill GEMM (cpu_gemm.h)
  double eps;
};

struct LayerStack {
  StackConfig cfg;
  std::vector<StackLayer> layers;
  bool token_region = false;  // cpu_step.h serves its one-token steps
  std::vector<int64_t> widths;  // the packed linears' distinct bit widths (int8_for, per step)
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

template <typename E>
E schema_enum(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v < static_cast<int64_t>(E::count), "kbitrt_cpu: layer stack ", what,
              " code ", v, " is not in cpu_schema.h");
  return static_cast<E>(v);
}

StackConfig stack_config(const int64_t* c, double eps) {
  namespace f = schema::config_int;
  return StackConfig{c[f::n_heads], c[f::n_kv_heads], c[f::head_dim],
                     schema_enum<schema::Norm>(c[f::norm], "norm"),
                     schema_enum<schema::Act>(c[f::act], "act"),
                     schema_enum<schema::Qkv>(c[f::qkv], "qkv"),
                     schema_enum<schema::Mlp>(c[f::mlp], "mlp"),
                     c[f::parallel_residual] != 0, c[f::post_norm] != 0,
                     c[f::residual_from_norm] != 0, c[f::fused_max_rows], eps};
}

// one layer from its ints (li) and tensors (t), laid out as cpu_schema.h says
StackLayer stack_layer(const int64_t* li, const at::Tensor* t, int64_t l) {
  namespace lt = schema::layer_tensor;
  namespace wi = schema::linear_int;
  namespace wt = schema::linear_tensor;
  auto opt = [](const at::Tensor& x) { return x.numel() ? x : at::Tensor(); };
  StackLayer layer;
  layer.norm1_w = opt(t[lt::norm1_w]), layer.norm1_b = opt(t[lt::norm1_b]);
  layer.norm2_w = opt(t[lt::norm2_w]), layer.norm2_b = opt(t[lt::norm2_b]);
  layer.k_cache = t[lt::k_cache], layer.v_cache = t[lt::v_cache];
  layer.mask_index = li[schema::layer_int::mask_index];
  for (int j = 0; j < schema::slot::count; ++j) {
    const int64_t* ints = li + schema::layer_int::linears + j * wi::count;
    const at::Tensor* ts = t + lt::linears + j * wt::count;
    StackLinear& s = layer.lin[j];
    s.kind = schema_enum<schema::LinearKind>(ints[wi::kind], "linear kind");
    s.bits = ints[wi::bits], s.block = ints[wi::block], s.in_features = ints[wi::in_features];
    s.w0 = opt(ts[wt::w0]), s.w1 = opt(ts[wt::w1]), s.w2 = opt(ts[wt::w2]);
    s.bias = opt(ts[wt::bias]);
    if (s.kind == schema::LinearKind::packed && s.block % kGroup == 0 && s.w2.defined() &&
        s.w2.scalar_type() == at::kFloat && s.bits >= 3 && s.bits <= 8 &&
        s.w2.numel() >= (int64_t{1} << s.bits)) {
      auto t = std::make_shared<Int8Tables>();
      int8_tables(s.w2.contiguous().data_ptr<float>(), static_cast<int>(s.bits), *t);
      s.int8 = std::move(t);
    }
    TORCH_CHECK(s.kind == schema::LinearKind::absent || s.w0.defined(), "kbitrt_cpu: layer ", l,
                " linear ", j, " has no weight");
  }
  // what the loops read directly (runtime/layer_stack.py refuses the rest, with its reason)
  const at::ScalarType kv = layer.k_cache.scalar_type();
  TORCH_CHECK(all_float({&layer.norm1_w, &layer.norm1_b, &layer.norm2_w, &layer.norm2_b}),
              "kbitrt_cpu: layer ", l, " norms not contiguous fp32");
  TORCH_CHECK((kv == at::kFloat || kv == at::kHalf || kv == at::kBFloat16) &&
                  layer.v_cache.scalar_type() == kv && layer.k_cache.is_contiguous() &&
                  layer.v_cache.is_contiguous(),
              "kbitrt_cpu: layer ", l, " KV cache not contiguous fp32, fp16 or bf16");
  return layer;
}

bool token_region_fits(const StackConfig& c, const std::vector<StackLayer>& layers);  // cpu_step.h

// ints: the config (schema::config_int), then per layer schema::layer_int::count; tensors: per
// layer schema::layer_tensor::count, an empty tensor where there is none
int64_t layer_stack_create(const std::vector<at::Tensor>& tensors,
                           const std::vector<int64_t>& config, double eps) {
  TORCH_CHECK(config.size() >= schema::config_int::count,
              "kbitrt_cpu: layer stack config too short");
  const int64_t n_layers = config[schema::config_int::n_layers];
  TORCH_CHECK(static_cast<int64_t>(config.size()) ==
                      schema::config_int::count + n_layers * schema::layer_int::count &&
                  static_cast<int64_t>(tensors.size()) == n_layers * schema::layer_tensor::count,
              "kbitrt_cpu: layer stack config and tensors do not match ", n_layers, " layers");
  auto stack = std::make_shared<LayerStack>();
  stack->cfg = stack_config(config.data(), eps);
  for (int64_t l = 0; l < n_layers; ++l)
    stack->layers.push_back(stack_layer(
        config.data() + schema::config_int::count + l * schema::layer_int::count,
        tensors.data() + l * schema::layer_tensor::count, l));
  stack->token_region = token_region_fits(stack->cfg, stack->layers);
  for (const StackLayer& layer : stack->layers)
    for (const StackLinear& s : layer.lin)
      if (s.kind == schema::LinearKind::packed &&
          std::find(stack->widths.begin(), stack->widths.end(), s.bits) == stack->widths.end())
        stack->widths.push_back(s.bits);
  std::lock_guard<std::mutex> lock(g_stacks_mutex);
  g_stacks[g_next_stack] = std::move(stack);
  return g_next_stack++;
}

void layer_stack_free(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_stacks_mutex);
  g_stacks.erase(handle);
}

// cpu.half_linear (kernels/cpu.py): the fused loop up to fused_max_rows rows, above fp32
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

// KbitLinear.forward (linear.py) and, for dense weights, its dense_linear / nn.Linear; a batch's
// rows (batch x tokens) may exceed fused_max_rows: then the op's prefill GEMM, as there
at::Tensor stack_linear(const StackLinear& s, int64_t fused_max_rows, const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (s.kind == schema::LinearKind::dense) {
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
  // a decoding step's x is already contiguous fp32: one view, not reshape + to + contiguous
  // (each a dispatched op: ~4 per linear, ~480 of a SmolLM2 step's ~1,400)
  const bool ready = x.scalar_type() == at::kFloat && x.is_contiguous();
  const at::Tensor x2 = !ready ? x.reshape({-1, s.in_features}).to(at::kFloat).contiguous()
                        : x.dim() == 2 ? x : x.view({-1, s.in_features});
  const c10::optional<at::Tensor> bias =
      s.bias.defined() ? c10::optional<at::Tensor>(s.bias) : c10::nullopt;
  at::Tensor y;
  if (s.kind == schema::LinearKind::planes) {  // cpu_planes.h: w0 the planes, `bits` read
    y = x2.size(0) <= fused_max_rows
            ? kbit_linear_planes(x2, s.w0, s.w1, s.w2, bias, s.bits, s.block, s.in_features)
            : at::linear(x2, kbit_dequantize_planes(s.w0, s.w1, s.w2, s.bits, s.block,
                                                    s.in_features), s.bias);
  } else {  // above fused_max_rows the op runs its prefill GEMM (cpu_gemm.h), as cpu.py's
    y = kbit_linear(x2, s.w0, s.w1, s.w2, bias, s.bits, s.block, s.in_features);
  }
  shape.back() = y.size(1);
  if (x.dim() != 2) y = y.view(shape);  // the kernels' y is contiguous
  return ready ? y : y.to(x.scalar_type());
}

at::Tensor stack_act(const StackConfig& c, const at::Tensor& x) {
  switch (c.act) {
    case schema::Act::silu: return at::silu(x);
    case schema::Act::gelu: return at::gelu(x);
    case schema::Act::gelu_tanh: return at::gelu(x, "tanh");
    case schema::Act::relu: return at::relu(x);
    default: {  // GPT-2's gelu_new: transformers' NewGELUActivation formula, op by op
      const at::Tensor inner = (x + at::pow(x, 3.0) * 0.044715) * std::sqrt(2.0 / M_PI);
      return x * 0.5 * (at::tanh(inner) + 1.0);
    }
  }
}

#include "cpu_rows.h"
#include "cpu_step.h"

// Block.forward (model/decoder.py) with cpu_rows.h's loops between the linears
at::Tensor stack_block(const StackConfig& c, const StackLayer& layer, at::Tensor x,
                       const at::Tensor& input_pos, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& mask) {
  auto norm1 = [&](const at::Tensor& h) { return norm_rows(c, layer.norm1_w, layer.norm1_b, h); };
  auto norm2 = [&](const at::Tensor& h) { return norm_rows(c, layer.norm2_w, layer.norm2_b, h); };
  auto attention = [&](const at::Tensor& h) {
    switch (layer.k_cache.scalar_type()) {
      case at::kHalf: return attention_rows<at::Half>(c, layer, h, input_pos, cos, sin, mask);
      case at::kBFloat16:
        return attention_rows<at::BFloat16>(c, layer, h, input_pos, cos, sin, mask);
      default: return attention_rows<float>(c, layer, h, input_pos, cos, sin, mask);
    }
  };
  auto mlp = [&](const at::Tensor& h) { return mlp_rows(c, layer, h); };
  if (c.parallel_residual) {
    const at::Tensor a = attention(norm1(x));
    return add_rows(add_rows(x, a), mlp(norm2(x)));
  }
  at::Tensor h = c.post_norm ? x : norm1(x);
  x = add_rows(c.residual_from_norm ? h : x, attention(h));
  if (c.post_norm) x = norm1(x);
  h = c.post_norm ? x : norm2(x);
  x = add_rows(c.residual_from_norm ? h : x, mlp(h));
  return c.post_norm ? norm2(x) : x;
}

// every layer for x (B, T, dim) at cache slots input_pos (T,); cos, sin (B, 1, T, rd) or empty
// (no rotary positions); masks: the additive masks the layers' mask indices name (an empty one:
// causal with no padding, from input_pos); norm_w, norm_b: the decoder's final norm after the
// last layer, of the layers' kind and eps (empty: none here, the caller applies it). An empty
// result: the loops do not serve this step (nothing was written), the caller runs its layers
at::Tensor layer_stack_forward(int64_t handle, const at::Tensor& x, const at::Tensor& input_pos,
                               const at::Tensor& cos, const at::Tensor& sin,
                               const std::vector<at::Tensor>& masks, const at::Tensor& norm_w,
                               const at::Tensor& norm_b) {
  std::shared_ptr<const LayerStack> stack;
  {
    std::lock_guard<std::mutex> lock(g_stacks_mutex);
    auto it = g_stacks.find(handle);
    TORCH_CHECK(it != g_stacks.end(), "kbitrt_cpu: no layer stack ", handle);
    stack = it->second;
  }
  // the loops' steps: a decoding step's few rows, everything fp32 and contiguous
  bool served = x.size(1) <= stack->cfg.fused_max_rows && input_pos.scalar_type() == at::kLong &&
                input_pos.is_contiguous() && all_float({&x, &cos, &sin});
  for (const at::Tensor& m : masks)  // an empty mask: causal, implied by input_pos
    served = served && all_float({&m}) &&
             (m.numel() == 0 || m.size(-1) == stack->layers[0].k_cache.size(2));
  if (!served) return at::empty({0}, x.options());
  at::Tensor h = x;
  if (token_region_serves(*stack, x, masks)) {
    switch (stack->layers[0].k_cache.scalar_type()) {
      case at::kHalf: h = token_region<at::Half>(*stack, x, input_pos, cos, sin); break;
      case at::kBFloat16: h = token_region<at::BFloat16>(*stack, x, input_pos, cos, sin); break;
      default: h = token_region<float>(*stack, x, input_pos, cos, sin); break;
    }
  } else {
    for (const StackLayer& layer : stack->layers) {
      TORCH_CHECK(layer.mask_index < static_cast<int64_t>(masks.size()),
                  "kbitrt_cpu: a layer's mask is missing");
      h = stack_block(stack->cfg, layer, h, input_pos, cos, sin, masks[layer.mask_index]);
    }
  }
  if (norm_w.numel()) {  // in C++: torch's rms_norm after the layers cost ~0.2 ms, cold
    TORCH_CHECK(all_float({&norm_w, &norm_b}) && norm_w.numel() == h.size(-1) &&
                    (!norm_b.numel() || norm_b.numel() == h.size(-1)),
                "kbitrt_cpu: the final norm's weights are not ", h.size(-1), " contiguous fp32");
    h = norm_rows(stack->cfg, norm_w, norm_b.numel() ? norm_b : at::Tensor(), h);
  }
  return h;
}
