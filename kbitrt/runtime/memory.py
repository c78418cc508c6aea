"""The CPU process's heap during a load: glibc's mmap threshold lowered while many small
tensors come and go (no heap holes), and free heap handed back to the OS afterwards (malloc_trim);
during a long step (a prefill) the heap kept for its large temporaries (heap_for_layers)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import lru_cache

from kbitrt.runtime.kernels.cpu import FUSED_MAX_ROWS


@lru_cache(maxsize=1)  # find_library runs ldconfig: once
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_heap_growth(threshold_kib: int = 128) -> None:
    """glibc: serve allocations >= 128 KiB from mmap and give them back when freed. Loading
    dequantizes layer after layer into temporaries of many sizes; with glibc's default adaptive
    threshold they fragment the heap and the peak RSS measured ~600 MB above what the model holds
    (SmolLM2, 2 cores). Building a model lowers it further (`threshold_kib`), so the small packed
    k and v projections that merging q, k and v frees leave no holes in the heap (SmolLM2
    --low-memory: 0.6 MB less resident); decoding steps keep 128 KiB, as their buffers are reused.
    Harmless elsewhere (no glibc: nothing is done)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold_kib * 1024)  # M_MMAP_THRESHOLD (fixed: disables the adaptive one)


def release_free_heap() -> None:
    """glibc: hand the heap's free pages back (malloc_trim). Loading a tokenizer parses its JSON
    into ~40 MB of temporaries (SmolLM2's: RSS +55 MB, +17 MB after the trim) that would otherwise
    stay resident under the model loaded next; building the model frees the parts of merged
    projections and the warm-up token's temporaries (SmolLM2 nf4 --low-memory: 6 MB resident).
    benchmarks/cpu_memory_breakdown.py measures both."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def heap_for_layers(x):
    """The context for a forward's layers over x (B, T, dim): for a long step on the CPU (a
    prefill), glibc keeps the freed memory of its large temporaries in the heap for the next ones
    instead of unmapping each (limit_heap_growth's fixed threshold), which otherwise maps, faults
    in and zeroes fresh pages for every large temporary of every layer. A long step: more rows
    (batch x tokens) than the fused kernels take, the steps kbit_linear's GEMM runs. Afterwards
    the threshold is back and the freed heap handed back (malloc_trim), so what stays resident
    is what it was."""
    if x.device.type != "cpu" or x.shape[0] * x.shape[1] <= FUSED_MAX_ROWS:
        return nullcontext()
    libc = _libc()
    return _kept_heap(libc) if libc is not None and hasattr(libc, "mallopt") else nullcontext()


@contextmanager
def _kept_heap(libc):
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free memory at the heap's top stays
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB from the heap
    try:
        yield
    finally:
        libc.mallopt(-1, 128 * 1024)  # glibc's default, what the fixed threshold left
        limit_heap_growth()
        release_free_heap()
