"""Latency, llama-bench style: prefill (pp N) and decode (tg N) tokens/s, mean +/- std over
repetitions after warm-up, per batch size; and a kernel table (us, GB/s, % of copy bandwidth).

pp N: one forward over B x N random tokens into an empty KV cache (B * N / seconds).
tg N: N single-token decode steps after a one-token prompt (B * N / seconds), greedy tokens fed
back. On CUDA the native decode step is compiled with CUDA graphs, as `kbit run` does.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from kbitrt.errors import RunError
from kbitrt.runtime.devices import synchronize
from kbitrt.runtime.loader import LoadedModel


@dataclass
class BenchRow:
    test: str  # pp512 | tg128
    batch: int
    tokens_per_s: float  # mean over reps
    std: float
    reps: list[float] = field(default_factory=list)  # tokens/s per repetition

    def to_json(self) -> dict:
        return asdict(self)



@torch.no_grad()
def time_prefill(lm: LoadedModel, batch: int, n: int, gen: torch.Generator) -> float:
    vocab = lm.config.get("vocab_size") or lm.tokenizer.vocab_size
    ids = torch.randint(0, vocab, (batch, n), generator=gen).to(lm.device)
    lm.model.setup_caches(batch, n)
    try:
        synchronize(lm.device)
        t0 = time.perf_counter()
        lm.model(ids, torch.arange(n, device=lm.device), last_only=True)
        synchronize(lm.device)
        return time.perf_counter() - t0
    finally:
        lm.model.drop_caches()


@torch.no_grad()
def time_decode(lm: LoadedModel, batch: int, n: int, gen: torch.Generator, step=None) -> float:
    vocab = lm.config.get("vocab_size") or lm.tokenizer.vocab_size
    model, step = lm.model, step or lm.model
    tok = torch.randint(0, vocab, (batch, 1), generator=gen).to(lm.device)
    model.setup_caches(batch, n + 1)
    try:
        logits = model(tok, torch.arange(1, device=lm.device))
        pos = torch.ones(1, dtype=torch.long, device=lm.device)
        synchronize(lm.device)
        t0 = time.perf_counter()
        for i in range(n):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            pos.fill_(1 + i)
            logits = step(tok, pos)
        synchronize(lm.device)
        return time.perf_counter() - t0
    finally:
        model.drop_caches()


def run_bench(lm: LoadedModel, batches: list[int], prompt: int = 512, gen: int = 128,
              reps: int = 5, warmup: int = 1, compile: bool | str = "auto",
              on_step: Callable[[str], None] | None = None) -> list[BenchRow]:
    """pp `prompt` and tg `gen` rows for every batch size (either length 0 skips its test)."""
    from kbitrt.runtime.generate import decode_step

    if reps < 1 or warmup < 0:
        raise RunError("--reps must be >= 1 and --warmup >= 0")
    limit = lm.max_positions
    for n, what in ((prompt, "-p"), (gen + 1, "-n")):
        if limit and n > limit:
            raise RunError(f"{what} {n}: the model holds at most {limit} positions")
    step, _ = decode_step(lm, compile)
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        for test, n, fn in (("pp", prompt, lambda: time_prefill(lm, b, prompt, g)),
                            ("tg", gen, lambda: time_decode(lm, b, gen, g, step))):
            if n <= 0:
                continue
            if on_step:
                on_step(f"{test}{n} batch {b}")
            for _ in range(warmup):
                fn()
            speeds = [b * n / fn() for _ in range(reps)]
            rows.append(BenchRow(f"{test}{n}", b, statistics.fmean(speeds),
                                 statistics.stdev(speeds) if len(speeds) > 1 else 0.0, speeds))
    return rows


# -------------------------------------------------------------------------------------- memory

def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; else the peak, the best we know)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def held_weights(model: torch.nn.Module) -> dict:
    """What the model keeps resident for its quantized linears: bits per quantized weight (packed
    buffers, dense copies, caches, biases, all counted) and the bytes of everything else."""
    from kbitrt.runtime.linear import KbitLinear

    q_params = q_bytes = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, KbitLinear):
            q_params += module.in_features * module.out_features
            q_bytes += module.held_bytes()
            seen.update(t.data_ptr() for t in module.buffers(recurse=False))
    other = {t.data_ptr(): t.numel() * t.element_size()
             for t in list(model.parameters()) + list(model.buffers())
             if t.data_ptr() not in seen}
    return {"quantized_params": q_params, "quantized_bytes_held": q_bytes,
            "bits_per_quantized_weight_held": 8 * q_bytes / q_params if q_params else None,
            "other_bytes_held": sum(other.values())}


def import_run_code(model: str, device: str) -> None:
    """Import the code loading `model` will run, without reading any weight: the model's
    transformers config class (~50 MB of config machinery) and, on the CPU, the fused kernels'
    library. `kbit bench` calls this before it takes the RSS after imports, so its model memory is
    what benchmarks/cpu_decode.py measures: the model's, not the code's. Errors are left to the
    load (a bad config or device fails there with its own message)."""
    import json
    from pathlib import Path

    from kbitrt.errors import KbitError
    from kbitrt.runtime.kernels import cpu as cpu_kernels
    from kbitrt.model.families import hf_config

    try:
        hf_config(json.loads((Path(model) / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError, KbitError):
        pass
    if str(device).startswith("cpu") or (device == "auto" and not torch.cuda.is_available()):
        cpu_kernels.available()


def memory_record(rss_before_load: int) -> dict:
    """Peak RSS, the RSS after imports (before the model), and their difference (model memory)."""
    peak = peak_rss_bytes()
    return {"rss_after_imports_mb": rss_before_load / 2**20, "peak_rss_mb": peak / 2**20,
            "model_memory_mb": (peak - rss_before_load) / 2**20}


# -------------------------------------------------------------------------------------- kernels

def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(device: torch.device, nbytes: int = 2**28) -> float:
    """Bytes/s of a plain tensor copy, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), device, 5)


@torch.no_grad()
def kernel_table(lm: LoadedModel, m: int = 1, reps: int = 20) -> tuple[list[dict], float]:
    """One row per distinct KbitLinear shape in the model: the k-bit op at M=m against a dense
    matmul of the dequantized weight in the compute dtype. Returns (rows, copy bytes/s).

    A simple version of benchmarks/kernel_bench.py (which rotates weight copies through L2 and replays
    CUDA graphs on a GPU): here one weight is called repeatedly, so small ones may sit in cache."""
    from kbitrt.runtime.kernels import kbit_linear
    from kbitrt.runtime.linear import KbitLinear

    device, dtype = lm.device, lm.dtype
    bw = copy_bandwidth(device)
    rows, seen = [], set()
    for name, mod in lm.model.named_modules():
        if not isinstance(mod, KbitLinear) or (mod.out_features, mod.in_features) in seen:
            continue
        if mod.packed_released:
            raise RunError("the kernel table needs the packed weights: load the model with "
                           "cpu_weights='packed' (kbit bench --kernels does)")
        seen.add((mod.out_features, mod.in_features))
        x = torch.randn(m, mod.in_features, device=device, dtype=dtype)
        idx, ow = mod.outliers()
        t = _time(lambda: kbit_linear(x, mod.qweight, mod.absmax, mod.codebook, mod.bias, idx, ow,
                                      mod.bits, mod.block_size, mod.in_features), device, reps)
        w = mod.dequantize(dtype)
        t_dense = _time(lambda: torch.nn.functional.linear(x, w), device, reps)
        nbytes = mod.qweight.numel() + mod.absmax.numel() * mod.absmax.element_size()
        rows.append({"module": name, "N": mod.out_features, "K": mod.in_features, "M": m,
                     "bits": mod.bits, "block": mod.block_size, "us": t * 1e6,
                     "gbps": nbytes / t / 1e9, "pct_copy_bw": 100 * nbytes / t / bw,
                     "dense_us": t_dense * 1e6, "speedup_vs_dense": t_dense / t})
    return rows, bw


# -------------------------------------------------------------------------------- speculation

def speculative_bench(lm: LoadedModel, parent: int, draft: int, draft_tokens: int, gen: int = 128,
                      reps: int = 3, warmup: int = 1, prompt_tokens: int = 64,
                      compile: bool | str = "auto") -> dict:
    """Self-speculative decoding against the parent alone, on one model holding both widths
    (runtime/speculative.py): greedy, the first `prompt_tokens` tokens of the shipped Wikipedia
    sample as the prompt, `gen` new tokens. The two runs alternate (parent, speculative) so that a
    change of machine load hits both; tokens/s are decode tokens over decode seconds (prefill
    excluded), mean +/- std over reps after warm-up. Also: the acceptance rate (accepted drafts /
    drafted), tokens per round, and whether the speculative tokens equal the parent's."""
    from kbitrt.eval.data import sample_path
    from kbitrt.runtime.generate import generate
    from kbitrt.runtime.speculative import generate_speculative

    if reps < 1 or warmup < 0:
        raise RunError("--reps must be >= 1 and --warmup >= 0")
    text = sample_path("wiki-sample").read_text()[:20000]
    ids = lm.tokenizer(text)["input_ids"][:prompt_tokens]
    plain, spec, same = [], [], True
    last = None
    for i in range(warmup + reps):
        a = generate(lm, [ids], gen, bits=parent, compile=compile)
        b = generate_speculative(lm, [ids], gen, bits=parent, draft_bits=draft,
                                 draft_tokens=draft_tokens)
        same = same and a.token_ids == b.token_ids
        if i >= warmup:
            plain.append(a.stats.new_tokens_per_s)
            spec.append(b.stats.new_tokens_per_s)
            last = b.stats.speculation
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    return {"bits": parent, "draft_bits": draft, "draft_tokens": draft_tokens,
            "prompt_tokens": len(ids), "gen": gen, "reps": reps, "warmup": warmup,
            "parent_tokens_per_s": statistics.fmean(plain), "parent_std": sd(plain),
            "parent_reps": plain, "speculative_tokens_per_s": statistics.fmean(spec),
            "speculative_std": sd(spec), "speculative_reps": spec,
            "speedup": statistics.fmean(spec) / statistics.fmean(plain),
            "acceptance_rate": last["acceptance_rate"], "tokens_per_round": last["tokens_per_round"],
            "rounds": last["rounds"], "greedy_identical": same,
            "load_average": list(os.getloadavg())}
