"""Mixture-of-Experts models end to end: tiny checkpoints saved by transformers itself (the Hub's
per-expert layout for Mixtral, Qwen2/3-MoE and DeepSeek-V3; fused, transposed 3-D experts for
gpt-oss), converted by `kbit convert`'s converter, run on the transformers backend with
KbitExperts, and loaded by `from_pretrained`; logits against transformers' own forward on the
dequantized weights (fp32, CPU), greedy tokens through the KV cache (M=1 per selected expert)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, DeepseekV3Config, GptOssConfig,
                          MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig)

from kbitrt.convert.converter import convert
from kbitrt.format.config import KbitFormatError, QuantConfig
from kbitrt.format.experts import expert_params, split_expert_linear
from kbitrt.format.quantizer import quantize_weight
from kbitrt.format.reader import KbitModel
from kbitrt.runtime.experts import KbitExperts
from kbitrt.runtime.loader import build_model
from conftest import hf_weights

V = 96
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(
    mixtral=lambda: MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                  num_experts_per_tok=2),
    # shared expert with its sigmoid gate, top-k weights not renormalised
    qwen2_moe=lambda: Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=48,
                                     shared_expert_intermediate_size=96, num_experts=4,
                                     num_experts_per_tok=2, norm_topk_prob=False),
    # q/k norms, renormalised top-k, a dense layer (mlp_only_layers)
    qwen3_moe=lambda: Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=48,
                                     num_experts=4, num_experts_per_tok=2, head_dim=16,
                                     norm_topk_prob=True, mlp_only_layers=[0]),
    # MLA projections, group-limited sigmoid routing with its correction bias, shared experts,
    # a first dense layer, routed scaling
    deepseek_v3=lambda: DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4},
                                         intermediate_size=64, moe_intermediate_size=48,
                                         first_k_dense_replace=1, n_routed_experts=4,
                                         num_experts_per_tok=2, n_group=2, topk_group=1,
                                         q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                         qk_nope_head_dim=8, v_head_dim=8,
                                         routed_scaling_factor=2.5),
    # fused (E, in, out) experts with biases, interleaved gate/up, clamped activation, sinks
    gpt_oss=lambda: GptOssConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                 num_experts_per_tok=2, head_dim=16, swiglu_limit=0.5),
)
QUANT = QuantConfig(bits=4, block_size=32, dtype="nf")
ATOL = 2e-4


def save_tiny(family: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MOE[family](), dtype=torch.float32)
    for p in model.parameters():  # large enough that routing and every feature change the logits
        p.data.normal_(0, 0.2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family in MOE:
        src = save_tiny(family, root / f"{family}-src")
        convert(src, root / family, QUANT)
        out[family] = (src, root / family)
    return out


def dequantized_reference(path: Path) -> torch.nn.Module:
    """transformers' own model on the kbit folder's dequantized weights (experts re-fused)."""
    km = KbitModel.open(path)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    fused = expert_params(hf)
    state, stacks = {}, {}
    for module in km.modules:
        w = km.quantized(module).dequantize(torch.float32)
        split = split_expert_linear(module)
        if split and split[0] in fused:
            stacks.setdefault(split[0], {})[split[1]] = w.t() if fused[split[0]].transposed else w
        else:
            state[f"{module}.weight"] = w
    for name, per in stacks.items():
        state[name] = torch.stack([per[e] for e in range(len(per))])
    state.update({n: km.tensor(n).float() for n in km.plain_names})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("lm_head.weight")]
    return hf.eval()


def ids(batch: int = 2, tokens: int = 11) -> torch.Tensor:
    return torch.randint(0, V, (batch, tokens), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(MOE))
def test_every_expert_is_a_quantized_linear(moe_folders, family):
    src, path = moe_folders[family]
    km = KbitModel.open(path)  # validates the folder against the model transformers builds
    with torch.device("meta"):
        fused = expert_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)))
    assert fused
    for p in fused.values():
        for e in range(p.num_experts):
            assert (km.modules[p.linear(e)].out_features,
                    km.modules[p.linear(e)].in_features) == (p.out_features, p.in_features)
    routers = [n for n in km.plain_names if n.endswith(("mlp.gate.weight", "router.weight"))]
    assert routers and not any(m.endswith((".gate", ".router")) for m in km.modules)
    assert km.info(routers[0]).dtype in ("F16", "BF16")
    summary = km.summary()["experts"]
    assert set(summary) == set(fused) and {x["experts"] for x in summary.values()} == {4}


def test_hub_layout_expert_is_gate_then_up_quantized_like_a_linear(moe_folders):
    """Mixtral's expert e: rows w1 (gate) then w3 (up), quantized as one (2I, H) linear."""
    src, path = moe_folders["mixtral"]
    w = hf_weights(src)
    km = KbitModel.open(path)
    for e in (0, 3):
        prefix = f"model.layers.1.block_sparse_moe.experts.{e}"
        gate_up = torch.cat([w[f"{prefix}.w1.weight"], w[f"{prefix}.w3.weight"]])
        want = quantize_weight(gate_up, QUANT, "x")
        got = km.quantized(f"model.layers.1.mlp.experts.gate_up_proj.{e}")
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.absmax, want.absmax)
        down = quantize_weight(w[f"{prefix}.w2.weight"], QUANT, "x")
        assert torch.equal(km.quantized(f"model.layers.1.mlp.experts.down_proj.{e}").qweight,
                           down.qweight)


def test_fused_transposed_expert_is_its_slice_transposed(moe_folders):
    """gpt-oss holds (E, in, out): expert e is stored (out, in), like every linear."""
    src, path = moe_folders["gpt_oss"]
    w = hf_weights(src)["model.layers.0.mlp.experts.gate_up_proj"]  # (E, H, 2I)
    km = KbitModel.open(path)
    want = quantize_weight(w[2].t().contiguous(), QUANT, "x")
    assert torch.equal(km.quantized("model.layers.0.mlp.experts.gate_up_proj.2").qweight,
                       want.qweight)
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in km.plain_names


@pytest.mark.parametrize("family", list(MOE))
def test_transformers_backend_matches_transformers(moe_folders, family):
    _, path = moe_folders[family]
    ref = dequantized_reference(path)
    lm = build_model(KbitModel.open(path), "cpu", backend="transformers", cpu_weights="fp32")
    assert lm.backend == "transformers"
    experts = [m for m in lm.model.modules() if isinstance(m, KbitExperts)]
    assert experts and not any(p.dim() == 3 for p in lm.model.parameters())
    x = ids()
    with torch.no_grad():
        want, got = ref(x).logits, lm.model(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_greedy_decode_through_the_cache_matches_transformers(moe_folders, family):
    """Prefill then one token at a time (each selected expert at M=1) gives transformers' greedy
    tokens on the dequantized weights."""
    _, path = moe_folders[family]
    ref = dequantized_reference(path)
    lm = build_model(KbitModel.open(path), "cpu", backend="transformers", cpu_weights="packed")
    prompt = ids(1, 7)
    theirs = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[0, 7:].tolist()
    ours, seq = [], prompt
    lm.model.setup_caches(1, 15)
    with torch.no_grad():
        logits = lm.model(seq, torch.arange(7))
        for t in range(8):
            nxt = int(logits[0, -1].argmax())
            ours.append(nxt)
            logits = lm.model(torch.tensor([[nxt]]), torch.tensor([7 + t]))
    lm.model.drop_caches()
    assert ours == theirs


def test_packed_and_dense_experts_agree(moe_folders):
    """The fused CPU kernels on the packed codes compute what the fp32 copies do."""
    _, path = moe_folders["qwen2_moe"]
    x = ids()
    with torch.no_grad():
        a = build_model(KbitModel.open(path), "cpu", backend="transformers", cpu_weights="fp32").model(x)
        b = build_model(KbitModel.open(path), "cpu", backend="transformers", cpu_weights="packed").model(x)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_from_pretrained_loads_kbit_experts(moe_folders, family, tmp_path):
    import kbitrt  # noqa: F401 -- registers the kbit quantizer
    from kbitrt.runtime.linear import KbitLinear

    _, path = moe_folders[family]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, KbitLinear):
            m.cpu_dtype = torch.float32
    assert any(isinstance(m, KbitExperts) for m in model.modules())
    lm = build_model(KbitModel.open(path), "cpu", backend="transformers", cpu_weights="fp32")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, lm.model(x), atol=ATOL, rtol=0)
    if family == "qwen2_moe":  # its save writes the same folder again
        AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "again")
        a, b = hf_weights(path), hf_weights(tmp_path / "again")
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", ["mxfp4", "fp8"])
def test_already_quantized_moe_sources_are_refused_naming_the_format(moe_folders, tmp_path, method):
    src, _ = moe_folders["gpt_oss"]
    folder = tmp_path / "src"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KbitFormatError, match=method) as e:
        convert(folder, tmp_path / "out", QUANT)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_native_decoder_runs_moe_and_matches_transformers(moe_folders, family):
    """The generic decoder's MoE layers (model/moe.py): full forward, batch 2 with left
    padding, and prefill + one token at a time through the static cache (the Python layers: the
    CPU layer stack says it has no routed experts)."""
    from test_models import batch, cached_steps, hf_logits

    _, path = moe_folders[family]
    ref = dequantized_reference(path)
    lm = build_model(KbitModel.open(path), "cpu", backend="auto", cpu_weights="fp32")
    assert lm.backend == "native" and lm.note is None
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), ref(x).logits, atol=ATOL, rtol=0)
    tokens, mask, pad = batch()
    want = hf_logits(ref, tokens, mask)
    keep = mask.bool()
    got = cached_steps(lm.model, tokens, pad, 6)
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=1e-4)
    lm.model.setup_caches(1, 4)
    assert lm.model.cpu_layers.startswith("python (")
    lm.model.drop_caches()


def test_native_moe_on_packed_codes_matches_dense(moe_folders):
    """Each selected expert through the fused CPU kernels on its packed codes (M=1 at decode)."""
    from test_models import batch, cached_steps

    _, path = moe_folders["qwen3_moe"]
    tokens, mask, pad = batch()
    keep = mask.bool()
    dense = build_model(KbitModel.open(path), "cpu", backend="native", cpu_weights="fp32")
    packed = build_model(KbitModel.open(path), "cpu", backend="native", cpu_weights="packed")
    torch.testing.assert_close(cached_steps(packed.model, tokens, pad, 6)[keep],
                               cached_steps(dense.model, tokens, pad, 6)[keep], atol=ATOL, rtol=1e-4)


def test_inspect_shows_the_experts(moe_folders):
    from conftest import run_cli

    _, path = moe_folders["qwen2_moe"]
    r = run_cli("inspect", path)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "experts" in line)
    assert "16 linears" in row and "4 fused parameters x 4 experts" in row  # 2 layers x 2 params
    r = run_cli("inspect", path, "--json")
    summary = json.loads(r.output)["experts"]
    assert summary["model.layers.1.mlp.experts.down_proj"] == {"experts": 4, "shape": [64, 48]}


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_conversion_reads_one_expert_at_a_time(moe_folders, family, tmp_path, monkeypatch):
    """Streaming stays bounded: a fused (E, ., .) tensor is read one expert's slice at a time, and
    no read of an expert tensor is larger than one expert's matrix."""
    from kbitrt.convert.checkpoint import CheckpointTensors

    src, _ = moe_folders[family]
    reads = []
    original = CheckpointTensors.read

    def read(self, name, rows=None):
        t = original(self, name, rows)
        reads.append((name, self.shape(name), rows, t.numel()))
        return t

    monkeypatch.setattr(CheckpointTensors, "read", read)
    convert(src, tmp_path / "out", QUANT)
    expert_reads = [r for r in reads if ".experts." in r[0] and "bias" not in r[0]]
    assert expert_reads
    for name, shape, rows, numel in expert_reads:
        if len(shape) == 3:  # fused: one expert
            assert rows is not None and rows[1] - rows[0] == 1, (name, rows)
        assert numel <= max(shape[-1] * shape[-2], 2 * 48 * 64), (name, numel)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_dequantize_writes_fused_experts_transformers_loads(moe_folders, family, tmp_path):
    """`kbit dequantize` puts each expert back into transformers' fused tensors (gpt-oss: in its
    (E, in, out) orientation), so the dense folder loads and computes the dequantized model."""
    from kbitrt.convert.dequantize import dequantize_model

    _, path = moe_folders[family]
    dequantize_model(path, tmp_path / "dense", "fp32")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    ref = dequantized_reference(path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, ref(x).logits, atol=1e-5, rtol=0)
