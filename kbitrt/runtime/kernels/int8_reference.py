"""The pure-torch twin of the int8-activation CPU path (cpu_int8.h): the same arithmetic, the
integer sums exact and the rest in float64, so the kernels match it to fp32 rounding.

    kbit_linear_int8_torch(x, qweight, absmax, codebook, bias, bits, block_size, in_features)
"""

from __future__ import annotations

import torch

from kbitrt.format import packing

GROUP = 32  # activation values per int8 scale (cpu_int8.h kGroup)


def int8_codebook(codebook: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """int8 (2^bits,) rint(cb * 127 / cmax) and the fp32 cmax / 127 that scales it back; the int
    data type at 8 bits (the padded affine cb[c] = (c - 127) * step) exactly: c - 127 and step."""
    cb = codebook.float().reshape(-1)[: 1 << bits]
    if bits == 8:
        step = (cb[255] - cb[0]) / torch.tensor(255.0)
        grid = (torch.arange(256, dtype=torch.float32) - 127) * step
        if step > 0 and cb[127] == 0 and bool(((cb - grid).abs() <= 1e-6 * cb[0].abs()).all()):
            return (torch.arange(256) - 127).clamp(max=127).to(torch.int8), float(step)
    cmax = cb.abs().max()
    inv = torch.where(cmax > 0, torch.tensor(127.0) / cmax, torch.tensor(0.0))
    q = torch.round(cb * inv).clamp(-127, 127).to(torch.int8)
    return q, float(cmax / torch.tensor(127.0))


def quantize_x(x: torch.Tensor, cfac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> int8 (M, K) and fp32 group scales (M, ceil(K / 32)) times cfac."""
    m, k = x.shape
    ng = -(-k // GROUP)
    xp = torch.nn.functional.pad(x.float(), (0, ng * GROUP - k)).view(m, ng, GROUP)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xp * inv).clamp(-127, 127).to(torch.int8).view(m, -1)[:, :k]
    d = (amax.squeeze(-1) / torch.tensor(127.0)) * torch.tensor(cfac, dtype=torch.float32)
    return xq, d


def kbit_linear_int8_torch(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                           codebook: torch.Tensor, bias: torch.Tensor | None, bits: int,
                           block_size: int, in_features: int) -> torch.Tensor:
    """x (M, K) fp32 -> (M, N) fp32 as cpu_int8.h computes it."""
    k, n = in_features, qweight.shape[0]
    cbq, cfac = int8_codebook(codebook, bits)
    xq, d = quantize_x(x, cfac)
    codes = packing.unpack(qweight, k, bits).long()[:, :k]
    wq = cbq[codes].to(torch.int64)  # (N, K)
    ng = d.shape[1]
    pad = ng * GROUP - k
    wg = torch.nn.functional.pad(wq, (0, pad)).view(n, ng, GROUP)
    xg = torch.nn.functional.pad(xq.to(torch.int64), (0, pad)).view(-1, ng, GROUP)
    s = torch.einsum("mgi,ngi->mng", xg, wg)  # exact int64 sums per group
    blk = (torch.arange(ng) * GROUP) // block_size
    a = absmax.double()[:, blk]  # (N, ng)
    y = (s.double() * d.double()[:, None, :] * a[None]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.float()
