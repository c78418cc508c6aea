"""The stored layout of Mixture-of-Experts weights, pinned (docs/format.md, "Mixture of Experts").

A tiny Mixtral with deterministic weights, saved by transformers in the Hub's per-expert layout,
converted: the names, dtypes and shapes of its expert and router tensors and the bytes of each
expert's codes and scales. A change here is a format change: update docs/format.md first, then
regenerate with `python tests/test_moe_golden.py --regenerate`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "moe_v1.json"


def tiny_mixtral(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                        num_experts_per_tok=1, max_position_embeddings=16)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            n = p.numel()
            p.copy_(torch.sin(torch.arange(n, dtype=torch.float64) * (0.37 + i / 10)).view(p.shape))
    model.save_pretrained(folder)
    return folder


def current() -> dict:
    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig
    from kbitrt.format.reader import KbitModel

    with tempfile.TemporaryDirectory() as tmp:
        src = tiny_mixtral(Path(tmp) / "src")
        convert(src, Path(tmp) / "out", QuantConfig(bits=4, block_size=32, dtype="int"))
        km = KbitModel.open(Path(tmp) / "out")
        names = sorted(n for f in km.files.values() for n in f.tensors if ".mlp." in n)
        out = {"tensors": {}, "sha256": {}}
        for n in names:
            info = km.info(n)
            out["tensors"][n] = f"{info.dtype}{list(info.shape)}"
            if n.endswith((".qweight", ".absmax")):
                out["sha256"][n] = hashlib.sha256(km.read(n).numpy().tobytes()).hexdigest()
        return out


def test_moe_layout_matches_golden_file():
    golden = json.loads(GOLDEN.read_text())
    assert golden == current(), "MoE layout changed: update docs/format.md (see module docstring)"


def test_golden_names_one_linear_per_expert():
    """Independent of the code: the golden names follow docs/format.md's `<parameter>.<e>` rule."""
    golden = json.loads(GOLDEN.read_text())["tensors"]
    for param, (n, k) in (("gate_up_proj", (64, 32)), ("down_proj", (32, 32))):
        for e in range(2):
            m = f"model.layers.0.mlp.experts.{param}.{e}"
            assert golden[f"{m}.weight_shape"] == "I64[2]"
            assert golden[f"{m}.qweight"] == f"U8{[n, k * 4 // 8]}"
            assert golden[f"{m}.absmax"] == f"F16{[n, k // 32]}"
    assert golden["model.layers.0.mlp.gate.weight"] == "F16[2, 32]"


if __name__ == "__main__" and "--regenerate" in sys.argv:
    GOLDEN.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
