"""The CPU process's heap during a load: glibc's mmap threshold lowered while many small
tensors come and go (no heap holes), and free heap handed back to the OS afterwards (malloc_trim)."""

from __future__ import annotations






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

