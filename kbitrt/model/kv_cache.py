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

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_slots: int | None = None):
        """Write k, v (B, nkv, T, hd) at slots input_pos (T,); return the cache's first n_slots
        slots (default: all) in k's dtype (a 16-bit cache under fp32 activations, `--kv-cache
        fp16`, is widened to read)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        keys, values = self.k, self.v
        if n_slots is not None and n_slots < keys.shape[2]:
            keys, values = keys[:, :, :n_slots], values[:, :, :n_slots]
        return keys.to(k.dtype), values.to(v.dtype)

    def rows(self, start: int, stop: int) -> KVCache:
        """This cache's rows start..stop-1 as a cache of their own: views, so what a forward
        writes lands in the whole cache (a server runs its live rows, or one newcomer, on them)."""
        whole = self.whole
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", whole.k[start:stop], persistent=False)
        view.register_buffer("v", whole.v[start:stop], persistent=False)
        object.__setattr__(view, "parent", whole)  # not a submodule: the view does not own it
        return view

    @property
    def whole(self) -> KVCache:
        """The cache whose rows this one views (itself when it is no view)."""
        return self.__dict__.get("parent", self)
