"""Static KV cache: fixed-size buffers written in place, so a decode step has static shapes
(what CUDA graphs and torch.compile(mode="reduce-overhead") need)."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)  # (B, nkv, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nkv, T, hd) at slots input_pos (T,); return the whole cache in k's
        dtype (a 16-bit cache under fp32 activations, `--kv-cache fp16`, is widened to read)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k.to(k.dtype), self.v.to(v.dtype)
