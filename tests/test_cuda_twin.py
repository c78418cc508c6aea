"""The CUDA twin: CPU tensors sent through exactly the code the CUDA path runs (devices.cuda_twin),
with every Triton kernel under TRITON_INTERPRET=1: the op, the launch plan, the decode tables and
their cache, split-K, KbitLinear's GPU branch, the KV cache in the activations' dtype, generate's
decode loop, any-precision width switching, self-speculative decoding and a device map.

Each generate call is compared with the CPU path (fp32 activations, the C++ kernels, the layer
stack): greedy tokens equal with fp32 activations; with fp16/bf16 activations the logits of every
step, teacher-forced on the CPU path's tokens, within the kernels' parity tolerances. Only CUDA
graph capture, streams and device memory statistics stay outside (docs/kernels.md lists them).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.format.quantizer import quantize_weight
from kbitrt.runtime.devices import cuda_twin, gpu_path, twin_enabled
from kbitrt.runtime.generate import SamplingConfig, generate
from kbitrt.runtime.kernels import pad_codebook
from kbitrt.runtime.linear import KbitLinear
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.runtime.loader import build_model
from test_models import TINY, V

# with a GPU, TRITON_INTERPRET is off and tests/test_gpu.py runs the real CUDA path instead
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real CUDA path")
GREEDY = SamplingConfig(temperature=0.0)
NEW = 24  # decode steps per generate call (the issue asks for >= 24)
# where a test checks a width, a type or a device map, not the decode loop's length: the same
# lines run from the second step on (the tables' cache hit included), at a third of the time
# (each step ~7 interpreted launches: the suite's largest cost, ~15 of its minutes)
SHORT = 8
FIRST_ID = 3  # ids 0..2 are pad, eos ("t0", "t1") and the configs' special ids: not in prompts
ACT_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}  # relative to the logits' scale


@pytest.fixture
def twin():
    with cuda_twin():
        yield


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (t0 .. t95): prompts are token
    ids, and decoding them back is all generate needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0")


def tiny_hf(family: str, layers: int = 1):
    """One layer by default: the interpreter runs every launch of every step (~0.1 s each)."""
    torch.manual_seed(0)
    config = TINY[family]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):  # Qwen2, Mistral: one type per layer
        config.layer_types = config.layer_types[:layers]
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for p in hf.parameters():  # larger than the default init: clear argmax margins
        p.data.normal_(0, 0.2)
    # logit 0 for every id that may stop a row (the tokenizer's eos, configs' bos/eos/pad ids
    # 0..2): never the argmax, so every call decodes its full length
    hf.get_output_embeddings().weight.data[:FIRST_ID] = 0.0
    return hf


def prompts(lengths=(20, 5, 13), seed: int = 0) -> list[list[int]]:
    """Ragged prompts; the longest over 16 tokens, so the prefill takes the M > 16 kernel."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(FIRST_ID, V, (n,), generator=g).tolist() for n in lengths]


def both_paths(src, tokenizer, dtype=torch.float32, **kw):
    """(the CPU path's model, the same source built on the GPU path under the twin)."""
    cpu = build_model(src, "cpu", tokenizer=tokenizer, **kw)
    with cuda_twin():
        gpu = build_model(src, "cpu", dtype=dtype, tokenizer=tokenizer, **kw)
    return cpu, gpu


def greedy_tokens(lm, ps, twin: bool, new: int = NEW, **kw) -> list[list[int]]:
    if not twin:
        return generate(lm, ps, max_new_tokens=new, sampling=GREEDY, **kw).token_ids
    with cuda_twin():
        out = generate(lm, ps, max_new_tokens=new, sampling=GREEDY, **kw)
    assert "CUDA twin" in out.stats.device
    return out.token_ids


def assert_same_greedy(src, tokenizer, ps, new: int = NEW, **kw):
    cpu, gpu = both_paths(src, tokenizer, **kw)
    assert gpu.cpu_weights is None and cpu.cpu_weights is not None  # the GPU branch's policy
    ref = greedy_tokens(cpu, ps, False, new)
    assert all(len(t) == new for t in ref)  # no early eos: full length
    assert greedy_tokens(gpu, ps, True, new) == ref
    return gpu


# ---------------------------------------------------------------------------- the second call

def test_second_call_with_the_same_codebook_reuses_the_tables():
    """The crash every CUDA user hit: the decode-table cache compared codebook tensors with ==."""
    from kbitrt.runtime.kernels import triton_kbit as tk
    from kbitrt.runtime.kernels import words

    qw = quantize_weight(torch.randn(64, 128), QuantConfig(bits=5, block_size=64, dtype="nf"))
    cb = pad_codebook(qw.codebook, 5)
    x = torch.randn(1, 128).half()
    first = tk.kbit_linear_triton(x, qw.qweight, qw.absmax, cb, None, None, None, 5, 64, 128)
    table = words.decode_choice(cb, 5)[1]
    second = tk.kbit_linear_triton(x, qw.qweight, qw.absmax, cb, None, None, None, 5, 64, 128)
    assert torch.equal(first, second) and words.decode_choice(cb, 5)[1] is table
    cb.mul_(0.5)  # written in place: the tables are rebuilt, not served stale
    third = tk.kbit_linear_triton(x, qw.qweight, qw.absmax, cb, None, None, None, 5, 64, 128)
    torch.testing.assert_close(third.float(), first.float() * 0.5, rtol=2e-3, atol=2e-3)
    key = id(cb)
    del cb
    assert key not in words._TABLES  # dropped with the codebook


@pytest.mark.parametrize("m", [1, 5])
def test_kbit_linear_layer_called_twice_on_the_gpu_path(twin, m):
    qw = quantize_weight(torch.randn(96, 128), QuantConfig(bits=4, block_size=64, dtype="nf"))
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float16, cpu_cache=False)
    x = torch.randn(m, 128).half()
    ref = x.float() @ qw.dequantize().t()
    for _ in range(2):
        y = lin(x)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_switch_scope():
    assert not twin_enabled() and not gpu_path("cpu")
    with cuda_twin():
        assert twin_enabled() and gpu_path("cpu") and gpu_path(torch.zeros(1))
    assert not gpu_path("cpu")


def test_the_env_switch(monkeypatch):
    monkeypatch.setenv("KBIT_CUDA_TWIN", "1")
    assert gpu_path("cpu")
    monkeypatch.setenv("KBIT_CUDA_TWIN", "0")
    assert not gpu_path("cpu")


# ------------------------------------------------------------------------- whole generate calls

@pytest.mark.parametrize("family", ["llama", "mistral_window", "qwen2", "gpt2", "neox", "opt",
                                    "bloom"])
def test_every_native_family_generates_as_on_the_cpu(family, tokenizer):
    """Batch 3, ragged prompts (20 tokens: the prefill kernel), 24 decode steps, 4-bit nf."""
    layers = 2 if family == "llama" else 1  # two layers: each with its own KV cache
    src = InMemoryKbit(tiny_hf(family, layers), QuantConfig(bits=4, block_size=64, dtype="nf"))
    assert_same_greedy(src, tokenizer, prompts())


WIDTHS = [(3, "nf", 64), (4, "int", 64), (5, "fp", 64), (6, "nf", 1024), (7, "nf", 64),
          (8, "int", 64), (8, "nf", 64), (4, "nf", 32), (3, "int", 32)]


@pytest.mark.parametrize("bits,dtype,block", WIDTHS, ids=[f"{d}{b}-b{blk}" for b, d, blk in WIDTHS])
def test_widths_types_and_blocks(bits, dtype, block, tokenizer):
    """Every k in 3..8, table and arithmetic decoders, blocks 32/64/1024; batch 1 (the GEMV)."""
    src = InMemoryKbit(tiny_hf("llama"), QuantConfig(bits=bits, block_size=block, dtype=dtype))
    assert_same_greedy(src, tokenizer, prompts((17,), seed=bits), new=SHORT)


def test_outliers_and_batch_16(tokenizer):
    """Proxy quantization (16-bit outlier columns) at batch 16: the M = 2..16 kernel."""
    q = QuantConfig(bits=4, block_size=64, dtype="nf", outliers=OutlierSpec.parse("top:5%"))
    src = InMemoryKbit(tiny_hf("qwen2"), q)
    assert_same_greedy(src, tokenizer, prompts(tuple(range(3, 19)), seed=16), new=SHORT)


@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_activations_follow_the_cpu_path(act, tokenizer):
    """fp16/bf16 activations, KV cache in the same dtype: every step's logits, teacher-forced on
    the CPU path's tokens, within the parity tolerance; generate runs its loop in that dtype."""
    src = InMemoryKbit(tiny_hf("llama"), QuantConfig(bits=4, block_size=64, dtype="nf"))
    cpu, gpu = both_paths(src, tokenizer, dtype=act)
    ps = prompts((20, 5))
    ref = generate(cpu, ps, max_new_tokens=NEW, sampling=GREEDY)
    with cuda_twin():
        out = generate(gpu, ps, max_new_tokens=NEW, sampling=GREEDY)
    ids = [p + t for p, t in zip(ps, ref.token_ids)]
    want = forced_logits(cpu.model, ids)
    with cuda_twin():
        got = forced_logits(gpu.model, ids)
    assert gpu.model.tok_emb.weight.dtype == act
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < ACT_TOL[act], f"{act}: relative logit error {err:.3g}"
    agree = sum(a == b for r, o in zip(ref.token_ids, out.token_ids) for a, b in zip(r, o))
    assert agree >= 0.9 * 2 * NEW  # tokens may part only where two logits tie within rounding


@torch.no_grad()
def forced_logits(model, ids: list[list[int]]) -> torch.Tensor:
    """fp32 logits of every position: a prefill of each row's first 17 tokens (left-padded),
    then one token per step through the KV cache, as generate decodes."""
    T = max(len(r) for r in ids)
    pad = torch.tensor([T - len(r) for r in ids])
    x = torch.tensor([[0] * (T - len(r)) + r for r in ids])
    P = 17 + int(pad.max())
    model.setup_caches(len(ids), T)
    try:
        out = [model(x[:, :P], torch.arange(P), pad).float()]
        for t in range(P, T):
            out.append(model(x[:, t:t + 1], torch.tensor([t]), pad).float())
    finally:
        model.drop_caches()
    logits = torch.cat(out, 1)  # (B, T, V)
    keep = torch.arange(T)[None, :] >= pad[:, None]
    return logits[keep]


# --------------------------------------------------------------- any-precision, speculation, maps

@pytest.fixture(scope="module")
def ap_llama(tmp_path_factory):
    """A one-layer Llama stored as an any-precision 3-8 file (one layer: width switching repacks
    every linear, and the interpreter runs 7 launches per layer and step)."""
    from kbitrt.convert.any_precision import convert_any_precision
    from kbitrt.format.bitplane import AnyPrecisionConfig

    root = tmp_path_factory.mktemp("twin-ap")
    tiny_hf("llama").save_pretrained(root / "src")
    convert_any_precision(root / "src", root / "ap", AnyPrecisionConfig(bits=8, min_bits=3,
                                                                       max_bits=8),
                          dtype16="fp16")
    return root / "ap"


def ap_model(folder, bits, tokenizer, twin: bool):
    from kbitrt.format.reader import KbitModel
    from kbitrt.runtime.any_precision import select_width

    src = select_width(KbitModel.open(folder), bits)
    if not twin:
        return build_model(src, "cpu", tokenizer=tokenizer)
    with cuda_twin():
        return build_model(src, "cpu", dtype=torch.float32, tokenizer=tokenizer)


def test_any_precision_width_switching(ap_llama, tokenizer):
    """One model loaded at 3-8 on the GPU path, generate at widths 3 and 8 in turn: each as the
    CPU path's model of that width."""
    gpu = ap_model(ap_llama, "3-8", tokenizer, twin=True)
    ps = prompts((18, 6), seed=3)
    for bits in (3, 8):
        cpu = ap_model(ap_llama, bits, tokenizer, twin=False)
        assert greedy_tokens(gpu, ps, True, bits=bits) == greedy_tokens(cpu, ps, False), bits


def test_self_speculative_decoding(ap_llama, tokenizer):
    """Draft at 3 bits, verify at 8: the greedy output is the parent's own, on the GPU path."""
    from kbitrt.runtime.speculative import generate_speculative

    ps = prompts((18,), seed=5)
    parent = greedy_tokens(ap_model(ap_llama, 8, tokenizer, twin=False), ps, False)
    gpu = ap_model(ap_llama, "3-8", tokenizer, twin=True)
    with cuda_twin():
        out = generate_speculative(gpu, ps, max_new_tokens=NEW, sampling=GREEDY, bits=8,
                                   draft_bits=3, draft_tokens=4)
    assert out.token_ids == parent
    assert out.stats.speculation["drafted"] > 0


def test_device_map_offloads_to_disk(tokenizer):
    """Layers held on disk and in RAM, run on the main device by hooks, on the GPU path."""
    src = InMemoryKbit(tiny_hf("llama", 2), QuantConfig(bits=4, block_size=64, dtype="nf"))
    ps = prompts((18, 7), seed=7)
    ref = greedy_tokens(build_model(src, "cpu", tokenizer=tokenizer), ps, False, SHORT)
    with cuda_twin():  # the head is tied to the embedding: both on one device
        lm = build_model(src, "cpu", dtype=torch.float32, tokenizer=tokenizer, device_map={
            "embed": "disk", "layers.0": "disk", "layers.1": "cpu", "head": "disk"})
    assert greedy_tokens(lm, ps, True, SHORT) == ref


def test_compiled_step_traces_the_op(twin):
    """torch.compile traces the custom op through its fake (what CUDA-graphed decode captures)."""
    qw = quantize_weight(torch.randn(64, 64), QuantConfig(bits=4, block_size=64, dtype="nf"))
    lin = KbitLinear.from_quantized(qw, None, compute_dtype=torch.float16, cpu_cache=False)
    x = torch.randn(1, 64).half()
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))


def test_docs_list_every_line_that_needs_a_gpu():
    """Each line the coverage gate leaves out (`pragma: no cover - needs a GPU`) is named in
    docs/kernels.md with its file, so what the twin cannot run stays a short, reviewed list."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["coverage"]["run"]
    docs = (root / "docs" / "kernels.md").read_text()
    section = docs[docs.index("## The CUDA twin"):]
    missing = []
    for pattern in include["include"]:
        rel = pattern.lstrip("*/")
        for line in (root / rel).read_text().splitlines():
            if "pragma: no cover" in line:
                code = line.split("#")[0].strip()
                assert "needs a GPU" in line, f"{rel}: {code}: say why (needs a GPU)"
                if f"`{code}`" not in section or rel.split("/")[-1] not in section:
                    missing.append(f"{rel}: {code}")
    assert not missing, "not listed in docs/kernels.md: " + "; ".join(missing)


def test_the_twin_refuses_a_compiling_triton(monkeypatch):
    """KBIT_CUDA_TWIN=1 without the interpreter would hand CPU pointers to compiled kernels."""
    from kbitrt.errors import RunError
    from kbitrt.runtime.kernels import triton_kbit

    monkeypatch.setattr(triton_kbit, "interpreted", lambda: False)
    monkeypatch.setenv("KBIT_CUDA_TWIN", "1")
    with pytest.raises(RunError, match="TRITON_INTERPRET=1"):
        gpu_path("cpu")
    with pytest.raises(RunError, match="TRITON_INTERPRET=1"):
        with cuda_twin():
            pass
