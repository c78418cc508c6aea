"""transformers integration: from_pretrained of a kbit folder gives KbitLinears, generates the same
greedy tokens as kbitrt's own runtime, and save_pretrained writes the same kbit folder back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hf_weights

import kbitrt  # noqa: F401  (registers the "kbit" quantizer)
from kbitrt.convert.converter import convert
from kbitrt.format.reader import KbitModel
from kbitrt.format.config import KbitFormatError, OutlierSpec, QuantConfig
from kbitrt.runtime.generate import eos_ids, generate
from kbitrt.runtime.linear import KbitLinear
from kbitrt.runtime.loader import load_model

from conftest import TINY_CONFIGS

SETTINGS = {  # one family each, together covering fp16/fp32/dq8 scales, outliers, odd k, biases
    "llama": QuantConfig(bits=4, block_size=32, dtype="nf"),
    "gpt2": QuantConfig(bits=5, block_size=64, dtype="int", absmax_dtype="fp32",
                        outliers=OutlierSpec.parse("top:5%")),
    "opt": QuantConfig(bits=3, block_size=32, dtype="quantile", absmax_dtype="dq8"),
}
PROMPT = [1, 17, 33, 5, 90, 12]


@pytest.fixture(scope="module")
def kbit_tiny(tiny_models, smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny kbit folders of each family, with SmolLM2's tokenizer so kbitrt's runtime can load them."""
    root = tmp_path_factory.mktemp("hf_kbit")
    out = {}
    for family, config in SETTINGS.items():
        src = root / f"{family}-src"
        shutil.copytree(tiny_models[family], src)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(smollm2_dir / f, src / f)
        out[family] = root / family
        convert(src, out[family], config)
    return out


def hf_load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw)


def greedy_both(path: Path, prompt: list[int], n: int) -> tuple[list[int], list[int], object]:
    """(kbitrt native tokens, transformers tokens, transformers model), fp32 on the CPU."""
    lm = load_model(path, device="cpu", backend="native", cpu_weights="fp32")
    res = generate(lm, [prompt], max_new_tokens=n)
    ours = res.token_ids[0]
    stops = sorted(eos_ids(lm))
    model = hf_load(path, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=stops or None, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    if theirs and theirs[-1] in stops and res.stop_reasons[0] == "eos":
        theirs = theirs[:-1]  # kbitrt reports the stop reason instead of the eos token
    return ours, theirs, model


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_from_pretrained_uses_kbit_linear_and_matches_native_greedy(kbit_tiny, family):
    path = kbit_tiny[family]
    ours, theirs, model = greedy_both(path, PROMPT, 12)
    assert ours == theirs and len(ours) > 0
    stored = KbitModel.open(path).modules
    swapped = {n for n, m in model.named_modules() if isinstance(m, KbitLinear)}
    assert len(swapped) == len(stored)
    assert not any(isinstance(m, torch.nn.Linear) and n in swapped for n, m in model.named_modules())
    assert model.config.quantization_config.to_dict()["quant_method"] == "kbit"


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_save_pretrained_writes_the_same_kbit_folder(kbit_tiny, tmp_path, family):
    path = kbit_tiny[family]
    model = hf_load(path)  # the stored 16-bit dtype
    model.save_pretrained(tmp_path / "again")
    again = KbitModel.open(tmp_path / "again")  # validates format, headers, shapes
    assert set(again.modules) == set(KbitModel.open(path).modules)
    a, b = hf_weights(path), hf_weights(tmp_path / "again")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    qc_a = KbitModel.open(path).config["quantization_config"]
    assert again.config["quantization_config"] == qc_a
    # and it loads again
    assert any(isinstance(m, KbitLinear) for m in hf_load(tmp_path / "again").modules())


def test_dequantize_gives_plain_linears(kbit_tiny):
    model = hf_load(kbit_tiny["llama"], dtype=torch.float32)
    for m in model.modules():  # exact fp32 CPU copies (the default holds 16-bit ones)
        if isinstance(m, KbitLinear):
            m.cpu_dtype = torch.float32
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = model(ids).logits
        model.dequantize()
        got = model(ids).logits
    assert not any(isinstance(m, KbitLinear) for m in model.modules())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_broken_folder_is_refused_before_loading(kbit_tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(kbit_tiny["llama"], broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated upload
    with pytest.raises(KbitFormatError, match="model.safetensors"):
        hf_load(broken)


def test_import_kbitrt_is_light_and_registers_when_transformers_loads():
    code = ("import sys, kbitrt\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            "from transformers.quantizers import auto\n"
            "assert 'kbit' in auto.AUTO_QUANTIZER_MAPPING\n"
            "assert 'kbit' in auto.AUTO_QUANTIZATION_CONFIG_MAPPING\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_smollm2_4bit_transformers_equals_native(smollm2_nf4):
    out = smollm2_nf4  # converted once per format version, shared by the real-model tests
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(out)("The capital of France is")["input_ids"]
    ours, theirs, _ = greedy_both(out, prompt, 12)
    assert ours == theirs and len(ours) == 12
