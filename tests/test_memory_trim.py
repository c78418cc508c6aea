"""CPU loading hands the heap's free pages back once the model is built (loader.release_free_heap
at the end of build_model): what loading freed (merged projections' parts, the warm-up token's
temporaries) does not stay resident under the run. benchmarks/cpu_memory_breakdown.py measures it."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch

from kbitrt.format.config import QuantConfig
from kbitrt.runtime import loader
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.model.decoder import Decoder


def _glibc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_build_model_trims_heap_after_the_warmup_token(monkeypatch, tiny_models):
    """The trim comes last: after the model is built and the warm-up token went through."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    source = InMemoryKbit(hf, QuantConfig(bits=4, block_size=32))
    calls = []
    forward = Decoder.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, *a, **kw: calls.append("forward")
                        or forward(self, *a, **kw))
    monkeypatch.setattr(loader, "release_free_heap", lambda: calls.append("trim"))
    lm = loader.build_model(source, "cpu", cpu_weights="packed")
    assert "forward" in calls and calls[-1] == "trim", calls
    assert lm.model(torch.tensor([[1, 2, 3]])).shape[-1] == hf.config.vocab_size


@pytest.mark.slow
@pytest.mark.skipif(_glibc_trim() is None or not os.path.exists("/proc/self/statm"),
                    reason="glibc's malloc_trim and /proc are needed")
def test_loaded_model_leaves_no_free_heap_to_trim(smollm2_nf4):
    """Right after load_model (SmolLM2 nf4, --low-memory) a malloc_trim finds almost nothing to
    hand back (without the trim at the end of build_model it returned ~6 MB)."""
    gc.collect()
    _glibc_trim().malloc_trim(0)
    lm = loader.load_model(smollm2_nf4, device="cpu", cpu_weights="packed")
    before = _rss()
    _glibc_trim().malloc_trim(0)
    returned = before - _rss()
    assert lm.cpu_weights == "packed"
    assert returned < 2 * 2**20, f"{returned / 2**20:.1f} MiB of free heap stayed resident"
