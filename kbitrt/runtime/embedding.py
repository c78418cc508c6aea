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


class QuantizedEmbedding(nn.Embedding):
    """nn.Embedding's forward over a k-bit table (a KbitLinear, shared with a tied head).

    An nn.Embedding subclass so that a model's own embedding class can be kept on top of it
    (`quantized_like`): Gemma's scaled embedding calls `super().forward(ids)` and multiplies, and
    that super() is then this lookup."""

    def __init__(self, table: KbitLinear, dtype: torch.dtype):
        nn.Module.__init__(self)  # not nn.Embedding's: it would allocate the dense table
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self._set_table(table, dtype)

    def _set_table(self, table: KbitLinear, dtype: torch.dtype) -> None:
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


_KEPT_CLASSES: dict[type, type] = {}


def quantized_like(old: nn.Embedding, table: KbitLinear, dtype: torch.dtype) -> QuantizedEmbedding:
    """A QuantizedEmbedding in place of the embedding `old` that keeps `old`'s class and state:
    a subclass of nn.Embedding (transformers' scaled embeddings) keeps its forward, buffers and
    attributes, and its `super().forward` becomes the k-bit lookup."""
    cls = type(old)
    if cls in (nn.Embedding, QuantizedEmbedding) or issubclass(cls, QuantizedEmbedding):
        return QuantizedEmbedding(table, dtype)
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"{cls.__name__} is not an embedding")
    kept = _KEPT_CLASSES.get(cls)
    if kept is None:  # (cls, QuantizedEmbedding): cls.forward's super() resolves to the lookup
        kept = _KEPT_CLASSES[cls] = type(f"Kbit{cls.__name__}", (cls, QuantizedEmbedding), {})
    module = kept.__new__(kept)
    module.__dict__.update(old.__dict__)
    module._parameters = {k: v for k, v in old._parameters.items() if k != "weight"}
    module._buffers, module._modules = dict(old._buffers), dict(old._modules)
    module._set_table(table, dtype)
    return module


def dense_like(module: QuantizedEmbedding, weight: torch.Tensor) -> nn.Embedding:
    """The model's own embedding class again, holding the dense (vocab, dim) `weight`."""
    cls = next(c for c in type(module).__mro__ if not issubclass(c, QuantizedEmbedding))
    dense = cls.__new__(cls)
    dense.__dict__.update({k: v for k, v in module.__dict__.items() if k not in ("table", "dtype")})
    dense._modules = {k: v for k, v in module._modules.items() if k != "table"}
    dense._parameters = {**module._parameters, "weight": nn.Parameter(weight, requires_grad=False)}
    return dense
