"""Decode benchmark: a Llama-2-7B-shaped model with random weights, k-bit vs fp16, one GPU.

    python benchmarks/decode.py                 # 4-bit nf, block 64, batch 1/4/16, 128 tokens
    python benchmarks/decode.py --shape smollm2-135m   # SmolLM2-135M-shaped, random weights
    python benchmarks/decode.py --tiny          # smoke test (tiny shape; runs on the CPU)

Random packed bytes are valid codes at any k, so the k-bit model is built directly (no
quantization pass). Each batch size: prefill 16 tokens, then time `--tokens` decode steps of the
native decoder (CUDA-graph decode via torch.compile on CUDA). The bandwidth ceiling is
(bytes of all linear weights read per step) / (device-to-device copy bandwidth, measured in the same
run); `% of copy BW` = achieved bytes/s over it. The fp16 model runs in the same process for
the baseline. Results: benchmarks/results/decode-<device>-<date>.json (device, versions, commit).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kbitrt.format import dtypes, packing  # noqa: E402
from kbitrt.format.blockwise import QuantizedWeight  # noqa: E402
from kbitrt.format.config import QuantConfig  # noqa: E402
from kbitrt.runtime.generate import decode_step  # noqa: E402
from kbitrt.runtime.devices import resolve_device, synchronize  # noqa: E402
from kbitrt.runtime.loader import build_model  # noqa: E402
from kbitrt.eval.results import git_commit  # noqa: E402

LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, tie_word_embeddings=False)
# SmolLM2-135M's shapes (random weights: the real checkpoint does not travel to a lent GPU)
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, tie_word_embeddings=True)
SHAPES = {"llama2-7b": LLAMA2_7B, "smollm2-135m": SMOLLM2_135M}
TINY = dict(LLAMA2_7B, vocab_size=1000, hidden_size=256, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


class RandomSource:
    """The KbitModel interface over random weights made on the target device, on demand."""

    def __init__(self, config: dict, quant: QuantConfig | None, device: torch.device,
                 dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, LlamaConfig

        self.config, self.device, self.dtype, self.path = config, device, dtype, None
        self.quant = quant or QuantConfig()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
        linears = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n != "lm_head"]
        self.shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        self.quantized_modules = linears if quant else []
        skip = {f"{n}.weight" for n in self.quantized_modules}
        self.plain_names = [n for n in self.shapes if n not in skip]
        self.gen = torch.Generator(device=device).manual_seed(0)

    def quantized(self, name: str) -> QuantizedWeight:
        n, k = self.shapes[f"{name}.weight"]
        bits, block = self.quant.bits, self.quant.block_size
        qweight = torch.randint(0, 256, (n, packing.packed_row_bytes(k, bits)), dtype=torch.uint8,
                                device=self.device, generator=self.gen)
        absmax = (torch.rand(n, -(-k // block), device=self.device, generator=self.gen) * 0.02
                  + 0.01).half()
        codebook = dtypes.fixed_codebook(self.quant).to(self.device)
        return QuantizedWeight(qweight, absmax, codebook, (n, k), bits, block)

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        return (torch.randn(shape, device=self.device, generator=self.gen) * 0.02).to(self.dtype)


def linear_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: every linear's weight (packed codes + scales, or fp16)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif type(m).__name__ == "KbitLinear":
            total += sum(b.numel() * b.element_size() for n, b in m.named_buffers()
                         if n in ("qweight", "absmax", "outlier_weight"))
    return total


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        t = time.perf_counter()
        b.copy_(a)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best



@torch.no_grad()
def time_decode(lm, batch: int, prompt: int, tokens: int, compile_mode) -> dict:
    model, device = lm.model, lm.device
    step, compiled = decode_step(lm, compile_mode)
    ids = torch.randint(0, lm.config["vocab_size"], (batch, prompt), device=device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    warm = 3 if compiled else 1  # compiled: the first calls record the CUDA graph
    model.setup_caches(batch, prompt + tokens + warm)
    try:
        logits = model(ids, torch.arange(prompt, device=device), pad, last_only=True)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([prompt], device=device)
        for i in range(warm):
            pos.fill_(prompt + i)
            nxt = step(nxt, pos, pad)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        t = time.perf_counter()
        for i in range(tokens):
            pos.fill_(prompt + warm + i)
            nxt = step(nxt, pos, pad)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        seconds = time.perf_counter() - t
    finally:
        model.drop_caches()
    return {"batch": batch, "tokens": tokens, "seconds": seconds,
            "steps_per_s": tokens / seconds, "tokens_per_s": batch * tokens / seconds,
            "compiled": compiled}


def bench(name, config, quant, device, dtype, batches, prompt, tokens, copy_bw, compile_mode):
    lm = build_model(RandomSource(config, quant, device, dtype), device, "native", dtype)
    nbytes = linear_bytes(lm.model)
    rows = []
    for b in batches:
        r = time_decode(lm, b, prompt, tokens, compile_mode)
        r.update(model=name, linear_bytes=nbytes,
                 pct_copy_bw=100 * nbytes * r["steps_per_s"] / copy_bw)
        rows.append(r)
        print(f"{name:>12}  batch {b:>3}: {r['tokens_per_s']:9.1f} tok/s  "
              f"{r['steps_per_s']:7.1f} steps/s  {r['pct_copy_bw']:5.1f}% of copy BW", flush=True)
    del lm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows



def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape, CPU ok (smoke test)")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES),
                   help="the model's shapes (random weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--dtype", default="nf")
    p.add_argument("--batches", default=None, help="comma list (default 1,4,16; tiny: 1,4)")
    p.add_argument("--tokens", type=int, default=None, help="decode steps (default 128; tiny: 8)")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 baseline")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: the full benchmark is for a GPU; use --tiny for a CPU smoke test",
              file=sys.stderr)
        return 2
    config = TINY if args.tiny else SHAPES[args.shape]
    batches = [int(b) for b in (args.batches or ("1,4" if args.tiny else "1,4,16")).split(",")]
    tokens = args.tokens or (8 if args.tiny else 128)
    act = torch.float16 if device.type == "cuda" else torch.float32
    quant = QuantConfig(bits=args.bits, block_size=args.block, dtype=args.dtype)
    compile_mode = False if args.no_compile else "auto"
    copy_bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**27)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"device {dev_name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)

    rows = bench(quant.label, config, quant, device, act, batches, 16, tokens, copy_bw,
                 compile_mode)
    if not args.no_fp16:
        base = "fp16" if act == torch.float16 else "fp32"
        rows += bench(base, config, None, device, act, batches, 16, tokens, copy_bw, compile_mode)

    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"decode-{'tiny' if args.tiny else args.shape}-{slug}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "decode", "model": "tiny-llama" if args.tiny else f"{args.shape}-shaped",
        "config": config, "quantization": quant.to_json(), "activation_dtype": str(act),
        "device": dev_name, "copy_bandwidth_bytes_per_s": copy_bw, "versions": _versions(),
        "git_commit": git_commit() or "unknown", "date": date, "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
