"""Shared fixtures: tiny random HF checkpoints of several families, and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The switch is read when triton.language is
# first imported, and transformers, bitsandbytes or lm-eval may import triton during collection, so
# it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speedup import skip_repatching_in_device_calls

    skip_repatching_in_device_calls()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
# the exact fp32 decode path: tests compare it with twins and HF to fp32 rounding; the default int8
# activations (kernels/cpu_int8.h) are checked by tests/test_cpu_int8.py
os.environ.setdefault("KBIT_CPU_ACTIVATIONS", "fp32")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `pytest -n N` (the README's test command): the cores shared out between the workers, so N
# workers of torch's default (one thread per core) do not oversubscribe the machine, spinning
# OpenMP threads taking cores from working ones. Subprocesses (the CLI, the README job) inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=64, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=128, max_position_embeddings=64,
                word_embed_proj_dim=64),
}


@pytest.fixture(scope="session", autouse=True)
def fused_cpu_kernels_built():
    """Build (or load) the fused CPU kernels once, before any test captures stderr: a first build
    prints a notice, which tests that count the lines of an error message must not see."""
    from kbitrt.runtime.kernels import cpu

    cpu.available()


def make_tiny_model(family: str, folder: Path, *, safe: bool = True, seed: int = 0) -> Path:
    """Save a tiny random model of `family` as an HF folder (safetensors or .bin)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = dict(TINY_CONFIGS[family])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=safe) if safe else _save_bin(model, folder)
    return folder


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors shards (small test models only)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def _save_bin(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    torch.save(sd, folder / "pytorch_model.bin")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from kbitrt.convert.gguf import ensure_smollm2

    try:
        return ensure_smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def make_tiny_llama(folder: Path, tokenizer_dir: Path, max_positions: int = 256, **extra) -> Path:
    """A tiny random Llama that reads text: SmolLM2's tokenizer, vocabulary to match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions,
                      **{"tie_word_embeddings": True, "eos_token_id": 2, **extra})
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tinytok") / "llama", smollm2_dir)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where CUDA is (a lent GPU), and skip on the CPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def smollm2_kbit_folder(smollm2_dir, bits: int = 4, block: int = 64, dtype: str = "nf"):
    """SmolLM2 converted by `kbit convert`, cached on disk under a key of the format's source code
    (so a change to the quantizer or the packing converts again). Shared with test_generate.py."""
    import hashlib
    import shutil
    from pathlib import Path

    import kbitrt
    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig
    from kbitrt.convert.gguf import DEFAULT_CACHE
    from kbitrt.convert.staging import waiting_lock

    h = hashlib.sha256()
    for layer in ("format", "convert"):
        for f in sorted((Path(kbitrt.__file__).parent / layer).glob("*.py")):
            h.update(f.read_bytes())
    stem = f"SmolLM2-135M-Instruct-{dtype}{bits}-b{block}-"
    out = DEFAULT_CACHE / f"{stem}{h.hexdigest()[:12]}"
    if (out / "config.json").exists():
        return out
    with waiting_lock(DEFAULT_CACHE / f".{stem}lock"):  # pytest -n: one worker converts
        if not (out / "config.json").exists():
            for old in DEFAULT_CACHE.glob(f"{stem}*"):  # conversions by older format code
                shutil.rmtree(old, ignore_errors=True)
            convert(smollm2_dir, out, QuantConfig(bits=bits, block_size=block, dtype=dtype),
                    force=True)
    return out


@pytest.fixture(scope="session")
def smollm2_nf4(smollm2_dir) -> Path:
    """SmolLM2 as nf4, block 64: converted once and shared by every real-model test."""
    return smollm2_kbit_folder(smollm2_dir)


def run_cli(*args):
    """`kbit ARGS...` in process (click's runner), arguments given as any str()-able values."""
    from click.testing import CliRunner

    from kbitrt.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, text: str) -> None:
    """The command failed with exit code 2 and one `error:` line on stderr that contains `text`."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr


@pytest.fixture
def int8_mode():
    """kernels.cpu.set_activations, with the mode before the test restored after it."""
    from kbitrt.runtime.kernels import cpu

    before = cpu.activations()
    yield cpu.set_activations
    cpu.set_activations(before)


def packed_with_zeros(n, k, bits, block, dtype="nf", seed=0):
    """A random (n, k) weight quantized for the CPU kernels, with a zero block in every row and a
    zero row: (qweight, kernel absmax, padded codebook)."""
    from kbitrt.format.config import QuantConfig
    from kbitrt.format.quantizer import quantize_weight
    from kbitrt.runtime.kernels.reference import pad_codebook

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, :block] = 0.0
    w[n // 2] = 0.0
    qw = quantize_weight(w, QuantConfig(bits=bits, block_size=block, dtype=dtype))
    return qw.qweight, qw.kernel_absmax(), pad_codebook(qw.codebook, bits)
