"""What a loaded model holds: a CPU KbitLinear's weights (packed codes or a 16-bit / fp32 copy,
`--cpu-weights`) and the KV cache's dtype (`--kv-cache`), with the choices `auto` makes."""

from __future__ import annotations


import torch

from kbitrt.errors import RunError
from kbitrt.runtime.devices import cpu_path
from kbitrt.runtime.kernels import cpu as cpu_kernels



# What a CPU KbitLinear holds: only the packed codes ("packed", --low-memory), read by the fused
# CPU kernels (kernels/cpu.py), or a dense copy in fp16 / bf16 / fp32 with the packed buffers freed.
# "auto": packed where the fused kernels run vectorized, else fp16 (cpu_weights_for)
CPU_WEIGHTS = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16,
               "fp32": torch.float32, "packed": None}


# what the KV cache holds (auto: the activations' dtype); a 16-bit cache under the CPU's fp32
# activations halves it, at fp16's rounding of keys and values (llama.cpp's default cache type).
# "low-memory" (what --low-memory asks for): fp16 under fp32 activations, else the activations'
KV_CACHES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "low-memory": None}


def check_cpu_weights(cpu_weights: str) -> str:
    if cpu_weights not in CPU_WEIGHTS:
        raise RunError(f"cpu weights {cpu_weights!r}: use one of {', '.join(CPU_WEIGHTS)}")
    return cpu_weights


def check_kv_cache(kv_cache: str) -> str:
    if kv_cache not in KV_CACHES:
        raise RunError(f"kv cache {kv_cache!r}: use one of {', '.join(KV_CACHES)}")
    return kv_cache


def kv_cache_for(kv_cache: str, dtype: torch.dtype) -> str:
    """The KV cache setting that takes effect under activations of `dtype` ("low-memory": fp16
    under fp32 activations, the CPU's; on CUDA the activations are 16-bit already)."""
    if kv_cache == "low-memory":
        return "fp16" if dtype == torch.float32 else "auto"
    return kv_cache


# widths the fused CPU kernels' fp32 path serves faster than fp16 copies (benchmarks/cpu_matmul.py,
# AVX-512, 2 threads, SmolLM2's linears per token: k=3..6 within -8%..+64% of fp16, while k=7 and
# 8, whose codebook lookup is a gather, take 1.3x and 1.8x as long). The int8-activation path
# (kernels/cpu_int8.h, the default) is faster than fp16 copies at every k
# (benchmarks/results/cpu_matmul_shapes-*.json), so under it every width stays packed.
PACKED_DEFAULT_MAX_BITS = 6


def cpu_weights_for(cpu_weights: str, device: torch.device, bits: int | None = None) -> str:
    """"auto" on the CPU: the packed codes where the fused CPU kernels run vectorized (a k-bit
    model holds k bits per weight), else fp16 copies; under fp32 activations
    (cpu.set_activations / KBIT_CPU_ACTIVATIONS=fp32) widths above PACKED_DEFAULT_MAX_BITS take
    fp16 copies too. Other values as given."""
    if cpu_weights != "auto":
        return cpu_weights
    if not cpu_path(device):  # what the GPU kernels read (CPU-offloaded layers included)
        return "packed"
    if not cpu_kernels.vectorized():
        return "fp16"
    if bits is not None and bits > PACKED_DEFAULT_MAX_BITS and cpu_kernels.activations() == "fp32":
        return "fp16"
    return "packed"
