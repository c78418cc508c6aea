"""A k-bit input embedding: the table stays packed codes, a lookup dequantizes only its rows.

The embedding (vocab, dim) is stored like a linear (`kbit convert --embedding-bits`): packed codes
per row, block scales along dim, a codebook. `QuantizedEmbedding` holds a KbitLinear of it and
gathers the looked-up rows' codes and scales, then dequantizes just those (the C++
kbit_dequantize on the CPU, its torch twin elsewhere). A tied model whose head and
embedding share a width stores the table once: the same KbitLinear is the output head (its
kernels: Triton on the GPU, the fused C++ ones on the CPU) and, here, the embedding. When that
head holds a dense 16-bit copy instead (`cpu_weights` fp16), the rows are gathered from the copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kbitrt.runtime.devices import cpu_path
from kbitrt.runtime.kernels import cpu as cpu_kernels
from kbitrt.runtime.kernels.reference import dequantize_packed
from kbitrt.runtime.linear import KbitLinear


def gather_dequantize(table: KbitLinear, ids: torch.Tensor) -> torch.Tensor:
    """fp32 (len(ids), dim): rows `ids` of the KbitLinear `table`, outlier columns included."""
    if table.dense_weight is not None:
        return F.embedding(ids, table.dense_weight).float()
    q, a = table.qweight[ids], table.absmax[ids]
    args = (q, a, table.codebook, table.bits, table.block_size, table.in_features)
    # the C++ kernel itself, not the custom op: a first op call imports ~100 MB (torch._dynamo)
    fused = cpu_path(ids.device) and cpu_kernels.available()
    rows = cpu_kernels.kbit_dequantize(*args) if fused else dequantize_packed(*args)
    idx, ow = table.outliers()
    if idx is not None:
        rows[:, idx] = ow[ids].float()
    return rows


def gather_dequantize_torch(table: KbitLinear, ids: torch.Tensor) -> torch.Tensor:
    """The pure-torch twin of gather_dequantize: the whole table dequantized, then indexed."""
    return table.dequantize(torch.float32)[ids]


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's forward over a k-bit table (a KbitLinear, shared with a tied head)."""

    def __init__(self, table: KbitLinear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor with the device and dtype of what a lookup returns (callers read
        `tok_emb.weight.device/.dtype`); the table itself is `self.table`."""
        return torch.empty(0, device=self.table.qweight.device, dtype=self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = gather_dequantize(self.table, ids.reshape(-1))
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.bits}-bit"
