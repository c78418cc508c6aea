"""The one quantize path for a matrix: block scales (absmax or mse), the codebook (fixed, or fitted
to the weights), codes and packing, fed whole (`quantize_weight`) or in row chunks (the streaming
converter drives `MatrixQuantizer` itself). The primitives live in blockwise.py, the scale search in
scales.py, the Lloyd-Max fit in lloyd.py."""

from __future__ import annotations

import torch

from kbitrt.format import dtypes, lloyd, packing, scales
from kbitrt.format.blockwise import (QuantizedWeight, block_absmax, check_finite, chunk_codes, chunk_rows,
                                     quantize_absmax, sample_index, select_outliers)
from kbitrt.format.config import QuantConfig


def quantize_weight(w: torch.Tensor, config: QuantConfig, name: str = "tensor",
                    dtype16: torch.dtype = torch.float16,
                    codebook: torch.Tensor | None = None,
                    importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a whole (N, K) matrix in memory: MatrixQuantizer over one chunk of rows.
    `codebook` replaces the data type's own (a codebook fitted elsewhere, e.g. to compare fits);
    `importance` (K,) weights each input column's error in the mse scales and the Lloyd fit."""
    outlier_idx = None
    if config.outliers is not None:
        check_finite(w, name)
        outlier_idx = select_outliers(w, config.outliers)
    q = MatrixQuantizer(config, w.shape, name, outlier_idx, dtype16, codebook, importance)
    for _ in range(q.passes):
        q.observe(0, w)
        q.finish_observing()
    part = q.quantize(0, w)
    if q.passes and config.absmax_dtype == "dq8":
        part.absmax, part.absmax_scale, part.absmax_offset = q.stored, q.scale, q.offset
    return part


class MatrixQuantizer:
    """The one quantize path for a matrix, fed in row chunks (the converter streams them from disk,
    `quantize_weight` gives the whole matrix as one chunk).

    Some settings need every row seen before any code is chosen: a data type fitted to the weights
    (its codebook), double-quantized scales (their 8-bit codes span the matrix), and `mse` scales
    with double quantization (a second look, once the codebook is known). `passes` says how many
    times to `observe` each chunk (calling `finish_observing` after each pass) before `quantize`.
    Outlier columns (`outlier_idx`) are kept in 16 bit and quantized as zeros. `importance` (K,)
    weights each input column's squared error where the weights are fitted (mse scales, lloyd).
    """

    def __init__(self, config: QuantConfig, shape: tuple[int, int], name: str = "tensor",
                 outlier_idx: torch.Tensor | None = None, dtype16: torch.dtype = torch.float16,
                 codebook: torch.Tensor | None = None, importance: torch.Tensor | None = None):
        self.config, self.name, self.dtype16 = config, name, dtype16
        self.importance = importance
        self.n, self.k = shape
        self.outlier_idx = outlier_idx
        self.data_type = dtypes.get(config.dtype)
        fit = self.data_type.fitted and codebook is None
        self.fit = fit  # the codebook is estimated from the weights in the first pass
        self.codebook = codebook if codebook is not None else \
            None if fit else self.data_type.codebook(config)
        dq8, mse = config.absmax_dtype == "dq8", config.scales != "absmax"
        self.passes = 2 if dq8 and mse and fit else int(fit or dq8)
        self._pass = 0
        self._absmax_parts: list[torch.Tensor] = []
        self._sample_parts: list[torch.Tensor] = []
        self.stored = self.scale = self.offset = self.absmax = None  # whole-matrix scales

    def _split(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w with the outlier columns zeroed, those columns in 16 bit); w itself is not changed."""
        idx = self.outlier_idx
        if idx is None:
            return w, None
        out_w = w[:, idx].to(self.dtype16)
        if idx.numel():
            w = w.clone()
            w[:, idx] = 0.0
        return w, out_w

    def _block_absmax(self, w: torch.Tensor) -> torch.Tensor:
        raw = block_absmax(w, self.config.block_size)
        if not torch.isfinite(raw).all():  # a NaN/Inf weight makes its block's absmax NaN/Inf
            check_finite(w, self.name)
        return raw

    def observe(self, r0: int, w: torch.Tensor) -> None:
        """Look at rows r0.. (float (rows, K)): pass 0 takes their block absmax and the weight
        sample a fitted type needs; pass 1 their block scales for the fitted codebook (mse)."""
        w, _ = self._split(w)
        if not self.fit or self._pass == 1:  # the codebook is known: the block scales for it
            self._absmax_parts.append(self._scales(w))
            return
        self._absmax_parts.append(self._block_absmax(w))
        if self.fit and self.data_type.whole_rows:  # every stride-th row, whole (format/lloyd.py)
            stride = lloyd.sample_stride(self.n, self.k)
            self._sample_parts.append(w[(-r0) % stride:: stride].float())
        elif self.fit:  # the raw sampled values; normalised once every absmax is known
            self._sample_parts.append(w.reshape(-1)[sample_index(r0, w.shape[0], self.n, self.k)])

    def finish_observing(self) -> None:
        raw = torch.cat(self._absmax_parts)
        if self._pass == 0 and self.fit and self.data_type.whole_rows:
            cfg = self.config
            # with importance and mse scales the codebook is the plain fit (absmax scales, no
            # weights) and the importance weights the scale search for it: weighting both (the
            # alternation) measured worse on SmolLM2 (docs/fidelity.md, issue 15)
            both = self.importance is not None and cfg.scales != "absmax"
            self.codebook = lloyd.fit_codebook(torch.cat(self._sample_parts), cfg.bits,
                                               cfg.block_size, "absmax" if both else cfg.scales,
                                               cfg.absmax_dtype, None if both else self.importance)
        self.stored, self.scale, self.offset, self.absmax = quantize_absmax(
            raw, self.config.absmax_dtype, self.name)
        if self._pass == 0 and self.fit and not self.data_type.whole_rows:
            idx = sample_index(0, self.n, self.n, self.k)
            safe = torch.where(self.absmax > 0, self.absmax, torch.ones_like(self.absmax))
            sample = torch.cat(self._sample_parts).float() / safe[idx // self.k,
                                                                  idx % self.k // self.config.block_size]
            self.codebook = self.data_type.codebook(self.config, sample)
        if self.config.scales != "absmax" and self.config.absmax_dtype != "dq8":
            self.stored = self.scale = self.offset = self.absmax = None  # chosen per chunk
        self._absmax_parts, self._sample_parts = [], []
        self._pass += 1

    def _scales(self, w: torch.Tensor) -> torch.Tensor:
        """Block scales of rows w for the codebook: absmax, or the least-squared-error ones."""
        if self.config.scales == "absmax":
            return self._block_absmax(w)
        self._block_absmax(w)  # refuses NaN/Inf by name
        return scales.block_scales(w, self.config.block_size, self.config.scales, self.codebook,
                                   self.config.absmax_dtype, self.importance)

    def quantize(self, r0: int, w: torch.Tensor) -> QuantizedWeight:
        """Rows r0.. of the matrix, quantized. With double-quantized scales (whose 8-bit codes
        cover the whole matrix: `stored`, `scale`, `offset`) the part holds its decoded fp32 scales."""
        cfg, (m, k) = self.config, w.shape
        w, out_w = self._split(w)
        if self.absmax is None:
            stored, _, _, absmax = quantize_absmax(self._scales(w), cfg.absmax_dtype, self.name)
        else:
            absmax = self.absmax[r0:r0 + m]
            stored = absmax if cfg.absmax_dtype == "dq8" else self.stored[r0:r0 + m]
        kp = packing.padded_len(k)
        qweight = torch.empty(m, packing.packed_row_bytes(k, cfg.bits), dtype=torch.uint8,
                              device=w.device)
        padded = torch.zeros(chunk_rows(k) * kp, dtype=torch.uint8, device=w.device)
        for c0, c1, codes in chunk_codes(w, absmax, self.codebook, cfg.block_size):
            c = padded[: (c1 - c0) * kp].view(c1 - c0, kp)
            if kp == k:
                c = codes
            else:
                c[:, :k] = codes  # columns k..kp stay 0
            packing.pack_padded(c, cfg.bits, qweight[c0:c1])
        return QuantizedWeight(
            qweight=qweight, absmax=stored, codebook=self.codebook, shape=(m, k), bits=cfg.bits,
            block_size=cfg.block_size, outlier_idx=self.outlier_idx, outlier_weight=out_w)
