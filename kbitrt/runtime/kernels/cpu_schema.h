// GENERATED from kbitrt/runtime/kernels/cpu_schema.py by
// `python -m kbitrt.runtime.kernels.cpu_schema`: do not edit by hand.
// Positions in layer_stack_create's ints and tensors, and the codes of its enums.
#pragma once

namespace schema {

enum class Norm : int64_t { rmsnorm = 0, layernorm = 1, count = 2 };
enum class Act : int64_t { silu = 0, gelu = 1, gelu_tanh = 2, relu = 3, gelu_new = 4, count = 5 };
enum class Qkv : int64_t { separate = 0, fused = 1, interleaved = 2, count = 3 };
enum class Mlp : int64_t { plain = 0, gated = 1, gated_fused = 2, count = 3 };
enum class LinearKind : int64_t { absent = 0, packed = 1, dense = 2, planes = 3, count = 4 };

namespace slot { enum : int { q = 0, k = 1, v = 2, o = 3, up = 4, gate = 5, down = 6, count = 7 }; }

namespace config_int {
enum : int64_t {
  n_layers = 0,
  n_heads = 1,
  n_kv_heads = 2,
  head_dim = 3,
  norm = 4,
  act = 5,
  qkv = 6,
  mlp = 7,
  parallel_residual = 8,
  post_norm = 9,
  residual_from_norm = 10,
  fused_max_rows = 11,
  count = 12
};
}  // namespace config_int

namespace layer_int {
enum : int64_t {
  mask_index = 0,
  linears = 1,  // then 7 linears of 4 each
  count = 29
};
}  // namespace layer_int

namespace layer_tensor {
enum : int64_t {
  norm1_w = 0,
  norm1_b = 1,
  norm2_w = 2,
  norm2_b = 3,
  k_cache = 4,
  v_cache = 5,
  linears = 6,  // then 7 linears of 4 each
  count = 34
};
}  // namespace layer_tensor

namespace linear_int {
enum : int64_t {
  kind = 0,
  bits = 1,
  block = 2,
  in_features = 3,
  count = 4
};
}  // namespace linear_int

namespace linear_tensor {
enum : int64_t {
  w0 = 0,
  w1 = 1,
  w2 = 2,
  bias = 3,
  count = 4
};
}  // namespace linear_tensor

}  // namespace schema
