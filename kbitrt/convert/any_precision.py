"""Any-precision conversion (Park et al., ICML 2024): one file, every width min_bits..max_bits.

Per quantized linear, zero-shot and data-free (docs/any_precision.md):
1. block scales as for any kbit model (one set for all widths);
2. the seed: the data type's codebook at the lowest width, codes by exact nearest rounding of the
   absmax-normalised weights (so the lowest width is exactly the direct conversion at that width);
3. for every extra bit, each level's bin (the normalised weights holding that code) is split in two
   by 1-D 2-means (Lloyd, on the sorted values: deterministic), the new bit appended below the old
   ones: code' = 2 code + (x >= t[code]), and the two children take the means of their halves.
The k-bit code is therefore exactly the top k bits of the parent code, and each width has its own
2^k-entry codebook. The fit runs on the same strided sample of at most 2^22 normalised values that
the quantile data type takes (the whole tensor below that size), so conversion stays streaming:
a tensor is read twice, in row chunks, as for dq8 scales.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from kbitrt.convert.converter import ConversionReport, Converter, convert
from kbitrt.format import blockwise, dtypes
from kbitrt.format.bitplane import AnyPrecisionConfig, pack_planes, tensor_specs
from kbitrt.format.config import (ABSMAX, ABSMAX_OFFSET, ABSMAX_SCALE, CODEBOOK, OUTLIER_IDX,
                                  OUTLIER_WEIGHT, QWEIGHT, SHAPE)
from kbitrt.format.safetensors_io import DTYPE_NAMES, PlannedTensor

FIT_SAMPLE = dtypes.WEIGHT_SAMPLE
MAX_LLOYD_STEPS = 100


# ----------------------------------------------------------------------------------- the split

def normalize(w: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 (N, K): w / its block's stored absmax, clamped to [-1, 1] (the quantizer's x)."""
    n, k = w.shape
    full, nb = k // block_size, -(-k // block_size)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).float()
    x = w.float().clone() if w.dtype == torch.float32 else w.float()
    if full:
        x[:, : full * block_size].view(n, full, block_size).div_(safe[:, :full, None])
    if nb > full:
        x[:, full * block_size:].div_(safe[:, full:])
    return x.clamp_(-1.0, 1.0)


def two_means(x: torch.Tensor, prefix: torch.Tensor, s: torch.Tensor, e: torch.Tensor):
    """Lloyd's 2-means on every bin x[s:e] at once; x sorted ascending (float32), prefix its float64
    cumulative sums with a leading 0. Each bin iterates t = (mean(x < t) + mean(x >= t)) / 2 from
    t = its mean until its partition stops moving (bins are independent: a converged bin stays).
    Returns (t float32, mean below, mean above); t = +inf where a bin holds fewer than two distinct
    values (everything then stays in the lower child)."""
    n = e - s
    ok = n > 0
    ok &= torch.where(ok, x[s.clamp(max=x.numel() - 1)] != x[(e - 1).clamp(min=0)], False)
    one = torch.ones_like(n)
    mean = (prefix[e] - prefix[s]) / n.clamp(min=1)

    def cut(t):  # first index with x >= t, kept inside the bin with both halves non-empty
        return torch.minimum(torch.maximum(torch.searchsorted(x, t), s + 1), (e - 1).clamp(min=0))

    def means(p):
        lo = (prefix[p] - prefix[s]) / torch.where(ok, p - s, one)
        hi = (prefix[e] - prefix[p]) / torch.where(ok, e - p, one)
        return lo, hi

    t = mean.float()
    p = cut(t)
    for _ in range(MAX_LLOYD_STEPS):
        lo, hi = means(p)
        t = ((lo + hi) / 2).float()
        q = cut(t)
        if torch.equal(q[ok], p[ok]):
            break
        p = q
    p = torch.searchsorted(x, t)  # the partition that `x >= t` gives
    ok &= (p > s) & (p < e)
    lo, hi = means(torch.where(ok, p, s))
    inf = torch.full_like(t, float("inf"))
    return torch.where(ok, t, inf), torch.where(ok, lo, mean).float(), torch.where(ok, hi, mean).float()


def zero_split(x: torch.Tensor, prefix: torch.Tensor, s: int, e: int):
    """Split the bin x[s:e] (sorted) of a level at exactly 0 so that one child keeps 0: the cut
    p minimising the bin's squared error with the other child at its mean (either side), among
    cuts between distinct values. Returns (t, lower value, upper value), or None when the bin holds
    fewer than two distinct values."""
    p = torch.arange(s + 1, e)
    p = p[x[p] != x[p - 1]]
    if p.numel() == 0:
        return None
    below = (prefix[p] - prefix[s]) / (p - s)  # mean of the lower child
    above = (prefix[e] - prefix[p]) / (e - p)
    # squared error saved against all-zero: n_lo mean_lo^2 (upper at 0) or n_hi mean_hi^2
    gain_lo = torch.where(below <= 0, below.square() * (p - s), -1.0)
    gain_hi = torch.where(above >= 0, above.square() * (e - p), -1.0)
    i, j = int(gain_lo.argmax()), int(gain_hi.argmax())
    if max(gain_lo[i], gain_hi[j]) < 0:
        return None
    if gain_lo[i] >= gain_hi[j]:
        return x[p[i]].item(), below[i].item(), 0.0
    return x[p[j]].item(), 0.0, above[j].item()


@dataclass
class SplitTree:
    """Per level k in min_bits..max_bits-1: thresholds (2^k,) float32; per width: codebook (2^k,)."""

    min_bits: int
    max_bits: int
    thresholds: dict[int, torch.Tensor] = field(default_factory=dict)
    codebooks: dict[int, torch.Tensor] = field(default_factory=dict)

    def codes(self, x: torch.Tensor, seed_codes: torch.Tensor) -> torch.Tensor:
        """Parent codes (max_bits) of normalised x from their seed codes: one bit per level."""
        c = seed_codes.to(torch.int64)
        for k in range(self.min_bits, self.max_bits):
            c = c * 2 + (x >= self.thresholds[k][c]).to(torch.int64)
        return c.to(torch.uint8)

    def packed_codebooks(self) -> torch.Tensor:
        """The stored `codebook` tensor: every width's 2^k values, lowest width first."""
        return torch.cat([self.codebooks[k] for k in range(self.min_bits, self.max_bits + 1)])


def fit_splits(x: torch.Tensor, seed_codebook: torch.Tensor, min_bits: int,
               max_bits: int) -> SplitTree:
    """Upscale the seed codebook one bit at a time by splitting every bin (the normalised values
    `x` nearest to one level) with 2-means."""
    tree = SplitTree(min_bits, max_bits)
    cb = torch.empty(2**min_bits, dtype=torch.float32)
    cb[: seed_codebook.numel()] = seed_codebook.float()
    cb[seed_codebook.numel():] = seed_codebook.float().max()  # unused codes: keep it sorted
    tree.codebooks[min_bits] = cb
    # nearest rounding and every split are monotone in x, so sorting x sorts the codes too
    x = x.reshape(-1).float().sort().values.contiguous()
    codes = dtypes.nearest_index(x, seed_codebook).to(torch.int64)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), x.double().cumsum(0)])
    if codes.numel() > 1 and not bool((codes[1:] >= codes[:-1]).all()):
        raise RuntimeError("seed codes are not monotone in the weights: the seed codebook is unsorted")
    for k in range(min_bits, max_bits):
        bounds = torch.searchsorted(codes, torch.arange(2**k + 1, dtype=torch.int64))
        s, e = bounds[:-1], bounds[1:]
        t, lo, hi = two_means(x, prefix, s, e)
        parent = tree.codebooks[k]
        for c in (parent == 0).nonzero().flatten().tolist():  # a level at 0 keeps a child at 0
            split = zero_split(x, prefix, int(s[c]), int(e[c]))
            if split is not None:
                t[c], lo[c], hi[c] = split
        empty = e == s  # no value holds this code: both children keep the parent's value
        child = torch.stack([torch.where(empty, parent, lo), torch.where(empty, parent, hi)], 1)
        tree.thresholds[k] = t
        tree.codebooks[k + 1] = child.reshape(-1).contiguous()
        codes = codes * 2 + (x >= t[codes]).to(torch.int64)
    return tree


def sample_positions(numel: int) -> int:
    """Stride of the strided fit sample (1 when the tensor is small enough to fit whole)."""
    return -(-numel // FIT_SAMPLE) if numel > FIT_SAMPLE else 1


def seed_codebook(config: AnyPrecisionConfig, x_sample: torch.Tensor) -> torch.Tensor:
    cb = dtypes.fixed_codebook(config.seed())
    return cb if cb is not None else dtypes.get("quantile").fit(config.min_bits, x_sample)


@dataclass
class AnyPrecisionWeight:
    """One (N, K) matrix quantized in memory (tests, the in-memory loader)."""

    planes: torch.Tensor  # uint8 (max_bits, N, ceil(K/8))
    codes: torch.Tensor  # uint8 (N, K) parent codes
    absmax: torch.Tensor  # float32 (N, n_blocks), as stored
    tree: SplitTree
    block_size: int

    def dequantize(self, bits: int) -> torch.Tensor:
        c = self.codes >> (self.tree.max_bits - bits)
        return blockwise.dequantize_blockwise(c, self.absmax, self.tree.codebooks[bits], self.block_size)


def quantize_any_precision(w: torch.Tensor, config: AnyPrecisionConfig) -> AnyPrecisionWeight:
    """The whole algorithm on one in-memory matrix (no outliers; fp16/fp32/dq8 scales)."""
    raw = blockwise.block_absmax(w, config.block_size)
    _, _, _, absmax = blockwise.quantize_absmax(raw, config.absmax_dtype)
    x = normalize(w, absmax, config.block_size)
    sample = x.reshape(-1)[:: sample_positions(x.numel())].contiguous()
    cb = seed_codebook(config, sample)
    seed = dtypes.nearest_index(x.contiguous(), cb)
    tree = fit_splits(sample, cb, config.min_bits, config.max_bits)
    codes = tree.codes(x, seed)
    return AnyPrecisionWeight(pack_planes(codes, config.max_bits), codes, absmax, tree,
                              config.block_size)


# ------------------------------------------------------------------------------- the converter

@dataclass
class AnyPrecisionReport(ConversionReport):
    width_error_sum: dict = field(default_factory=dict)  # bits -> sum of per-linear rel. errors
    width_bytes: dict = field(default_factory=dict)  # bits -> bytes of the quantized linears

    def to_json(self) -> dict:
        out = super().to_json()
        n = max(self.linears_quantized, 1)
        out["widths"] = [{"bits": b, "bits_per_param_quantized":
                          round(8 * self.width_bytes[b] / max(self.params_quantized, 1), 6),
                          "mean_rel_weight_error": round(self.width_error_sum[b] / n, 6)}
                         for b in sorted(self.width_bytes)]
        return out


class AnyPrecisionConverter(Converter):
    """The streaming converter with bit-plane linears: planning, plain tensors and sharding are
    the plain converter's; only what a quantized linear becomes differs."""

    config: AnyPrecisionConfig
    report_class = AnyPrecisionReport

    def finish_folder(self, folder, report: AnyPrecisionReport) -> None:
        with open(folder / "README.md", "a") as f:
            f.write(card_section(report.to_json(), self.config))

    def finish_report(self, report: AnyPrecisionReport) -> None:
        config = self.config
        for b in config.widths:  # what each width reads: b planes, the scales, its codebook
            codes_all = sum(lp.layout.out_features * -(-lp.layout.in_features // 8) * config.max_bits
                            for lp in self.linears)
            cbs = len(self.linears) * 4 * (2 ** (config.max_bits + 1) - 2**config.min_bits)
            report.width_bytes[b] = report.bytes_quantized - codes_all - cbs + \
                codes_all // config.max_bits * b + len(self.linears) * 4 * 2**b

    def planned_tensors(self) -> list[PlannedTensor]:
        d16 = DTYPE_NAMES[self.dtype16]
        out = [t for t in super().planned_tensors()
               if t.name.rpartition(".")[0] not in {lp.module for lp in self.linears}
               or t.name.rpartition(".")[2] == "bias"]
        for lp in self.linears:
            lay = lp.layout
            for suffix, (dtype, shape) in tensor_specs(lay.out_features, lay.in_features, self.config,
                                                       lay.n_outliers, d16).items():
                out.append(PlannedTensor(f"{lp.module}.{suffix}", dtype, shape))
        return sorted(out, key=lambda t: t.name)

    def _write_linear(self, lp, writers, report: AnyPrecisionReport) -> None:
        cfg, lay, name = self.config, lp.layout, lp.module
        idx = lp.outlier_idx
        n, k = lay.out_features, lay.in_features

        def rows():
            for r0, r1, w in self._rows(lp):
                blockwise.check_finite(w, lp.source)
                out_w = None
                if idx.numel():
                    out_w = w[:, idx].to(self.dtype16)
                    w[:, idx] = 0.0
                yield r0, r1, w, out_w

        def put(suffix, t, offset=0):
            writers[f"{name}.{suffix}"].write(f"{name}.{suffix}", t, offset)

        # pass 1: scales of every block and the fit sample (normalised values, seed codes later)
        parts = [blockwise.block_absmax(w, cfg.block_size) for _, _, w, _ in rows()]
        stored, scale, offset, absmax_all = blockwise.quantize_absmax(
            torch.cat(parts), cfg.absmax_dtype, lp.source)
        put(ABSMAX, stored)
        if cfg.absmax_dtype == "dq8":
            put(ABSMAX_SCALE, scale)
            put(ABSMAX_OFFSET, offset)
        stride = sample_positions(n * k)
        picks = []
        for r0, r1, w, _ in rows():
            x = normalize(w, absmax_all[r0:r1], cfg.block_size).reshape(-1)
            picks.append(x[(-r0 * k) % stride:: stride].clone())
        sample = torch.cat(picks).contiguous()
        cb = seed_codebook(cfg, sample)
        tree = fit_splits(sample, cb, cfg.min_bits, cfg.max_bits)
        # pass 2: parent codes, written plane by plane at their final offsets
        err = {b: 0.0 for b in cfg.widths}
        norm, pb = 0.0, -(-k // 8)
        for r0, r1, w, out_w in rows():
            a = absmax_all[r0:r1]
            x = normalize(w, a, cfg.block_size)
            codes = tree.codes(x, dtypes.nearest_index(x, cb))
            planes = pack_planes(codes, cfg.max_bits)
            for j in range(cfg.max_bits):
                put(QWEIGHT, planes[j], (j * n + r0) * pb)
            if out_w is not None:
                put(OUTLIER_WEIGHT, out_w, r0 * idx.numel() * out_w.element_size())
                w[:, idx] = out_w.float()
            for b in cfg.widths:
                deq = blockwise.dequantize_blockwise(codes >> (cfg.max_bits - b), a, tree.codebooks[b],
                                                     cfg.block_size, idx, out_w)
                err[b] += (deq - w).square().sum().item()
            norm += w.square().sum().item()
        put(CODEBOOK, tree.packed_codebooks())
        put(SHAPE, torch.tensor([n, k]))
        if idx.numel():
            put(OUTLIER_IDX, idx)
        report.params_quantized += n * k
        report.linears_quantized += 1
        report.outlier_columns += idx.numel()
        for b in cfg.widths:
            rel = (err[b] / norm) ** 0.5 if norm > 0 else 0.0
            report.width_error_sum[b] = report.width_error_sum.get(b, 0.0) + rel
        report.rel_error_sum += (err[cfg.max_bits] / norm) ** 0.5 if norm > 0 else 0.0

    def _rows(self, lp):
        """Row chunks of the (N, K) float32 weight (Conv1D weights are read whole and transposed)."""
        from kbitrt.convert.converter import CHUNK_ELEMS

        t = self.tensors
        if lp.transposed:
            w = t.read(lp.source).t().contiguous()
            step = max(1, CHUNK_ELEMS // max(w.shape[1], 1))
            for r0 in range(0, w.shape[0], step):
                yield r0, min(w.shape[0], r0 + step), w[r0: r0 + step].float()
            return
        n, k = t.shape(lp.source)
        step = max(1, CHUNK_ELEMS // max(k, 1))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            yield r0, r1, t.read(lp.source, (r0, r1)).float()


def convert_any_precision(source: str | os.PathLike, output: str | os.PathLike,
                          config: AnyPrecisionConfig, **options) -> AnyPrecisionReport:
    """`kbit convert SRC -o OUT --any-precision LO-HI`: streaming and atomic, as `convert`."""
    return convert(source, output, config, converter=AnyPrecisionConverter, **options)


def card_section(summary: dict, config: AnyPrecisionConfig) -> str:
    """What the model card adds for an any-precision model: its widths and how to run them."""
    lines = ["", "## Any-precision: one file, every width", "",
             f"This folder stores {config.max_bits}-bit parent codes as bit planes (packing "
             f"`bitplane-v1`); width k in {config.min_bits}..{config.max_bits} is read as the top k "
             "bits, with its own codebook (Any-Precision LLM, Park et al., ICML 2024). Pick the "
             "width at load time; transformers' `from_pretrained` does not serve this packing yet.",
             "", "```bash", "kbit run <this repo or folder> --bits 4 -p \"The capital of France is\"",
             "```", "", "| width | bits/param (quantized linears) | mean rel. weight error |",
             "|---:|---:|---:|"]
    for w in summary["widths"]:
        lines.append(f"| {w['bits']} | {w['bits_per_param_quantized']:.4f} | "
                     f"{w['mean_rel_weight_error']:.4f} |")
    return "\n".join(lines) + "\n"


def cli_config(text: str, ctx=None, **options) -> AnyPrecisionConfig:
    """The config of `kbit convert --any-precision LO-HI` (an explicit --bits must lie in it)."""
    from kbitrt.format.bitplane import parse_range

    lo, hi = parse_range(text, "--any-precision")
    if ctx is not None:
        import click.core

        if ctx.get_parameter_source("bits") == click.core.ParameterSource.COMMANDLINE:
            from kbitrt.errors import KbitFormatError

            raise KbitFormatError("--bits and --any-precision contradict each other: the range "
                                  "LO-HI sets the widths (drop --bits)")
    return AnyPrecisionConfig(bits=hi, min_bits=lo, max_bits=hi, **options)
