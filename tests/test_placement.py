"""`--device-map` / `--max-memory`: a model split over devices (here: CPU and disk offload, the
only devices this machine has) computes exactly what the unsplit model computes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.format.config import QuantConfig
from kbitrt.runtime.generate import SamplingConfig, generate
from kbitrt.runtime.in_memory import InMemoryKbit
from kbitrt.runtime.loader import build_model, load_model
from kbitrt.runtime.placement import (PlacementError, describe, native_units, parse_max_memory,
                                      parse_size, plan_native, unit_bytes)

IDS = torch.tensor([[1, 5, 9, 200, 3000, 7, 42], [3, 3, 8, 100, 11, 12, 13]])


@pytest.fixture(scope="module")
def kbit_dir(tiny_llama_with_tokenizer, tmp_path_factory):
    from kbitrt.convert.converter import convert

    out = tmp_path_factory.mktemp("placed") / "kbit"
    convert(tiny_llama_with_tokenizer, out, QuantConfig(bits=4, block_size=32, dtype="nf"))
    return out


@pytest.fixture(scope="module")
def unsplit(kbit_dir):
    return load_model(kbit_dir, device="cpu", backend="native")


def test_max_memory_and_sizes_parse_as_accelerate():
    assert parse_max_memory("0=20GiB,cpu=60GB, cuda:1=512MiB,disk=1000") == {
        "cuda:0": 20 * 2**30, "cpu": 60 * 10**9, "cuda:1": 512 * 2**20, "disk": 1000}
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("7") == 7
    assert parse_max_memory(None) == {}
    for bad, needle in (("0:20GiB", "DEVICE=SIZE"), ("cpu=lots", "not a size"), ("gpu=1GB", "device 'gpu'")):
        with pytest.raises(PlacementError, match=needle):
            parse_max_memory(bad)


def test_plans_fill_gpus_in_order_balance_and_keep_ties(unsplit):
    """Planning needs no GPU: give it two GPU names and budgets."""
    model = unsplit.model
    seen: set[int] = set()  # shared, as the planner does: a tied tensor counts once
    sizes = {u: unit_bytes(model, m, False, seen) for u, m in native_units(model).items()}
    assert list(sizes) == ["embed", "layers.0", "layers.1", "head"]
    assert sizes["head"] < 1000  # the head is tied to the embedding: only its norm counts
    gpus = ["cuda:0", "cuda:1"]
    big = {"cuda:0": 1 << 40, "cuda:1": 1 << 40, "cpu": 1 << 40}
    assert set(plan_native(model, "auto", big, gpus).values()) == {"cuda:0"}
    balanced = plan_native(model, "balanced", big, gpus)
    assert balanced["layers.1"] == "cuda:1" and balanced["embed"] == balanced["head"] == "cuda:0"
    # a first GPU that holds the embedding only: layers go to the next GPU, then CPU, then disk
    # (once anything is offloaded, the main GPU keeps room for a layer to visit it)
    layer = sizes["layers.0"]
    tight = {"cuda:0": sizes["embed"] + layer + 10, "cuda:1": layer + 10, "cpu": 0}
    plan = plan_native(model, "auto", tight, gpus)
    assert plan == {"embed": "cuda:0", "layers.0": "cuda:1", "layers.1": "disk", "head": "cuda:0"}
    assert describe(plan, torch.device("cuda:0")).startswith("device map: ")
    with pytest.raises(PlacementError, match="ties lm_head"):
        plan_native(model, {"embed": "cpu", "layers.0": "cpu", "layers.1": "cpu", "head": "disk"}, big, [])
    with pytest.raises(PlacementError, match="no device for layers.1"):
        plan_native(model, {"embed": "cpu", "layers.0": "cpu", "head": "cpu"}, big, [])
    with pytest.raises(PlacementError, match="not a usable GPU"):
        plan_native(model, {"embed": 0, "layers.0": 0, "layers.1": 0, "head": 0}, big, [])


def test_native_split_over_cpu_and_disk_gives_identical_logits_and_tokens(kbit_dir, unsplit, tmp_path):
    ref = unsplit.model(IDS)
    mapfile = tmp_path / "map.json"
    mapfile.write_text(json.dumps({"embed": "cpu", "layers.0": "disk", "layers.1": "cpu", "head": "cpu"}))
    for device_map, max_memory, where in ((str(mapfile), None, "layers.0 -> disk"),
                                          ("auto", "cpu=1MB", "embed,layers.0-1,head -> disk")):
        lm = load_model(kbit_dir, device="cpu", backend="native", device_map=device_map,
                        max_memory=max_memory)
        # the unsplit CPU model stacks q/k/v and gate/up (loader.merge_projections): one codebook
        # per stack instead of one per projection, a few hundred bytes fewer
        assert where in lm.note
        assert 0 <= lm.weight_bytes - unsplit.weight_bytes <= 64 * 3 * len(lm.model.layers)
        layer0 = lm.model.layers[0]
        assert all(t.is_meta for t in layer0.parameters())  # on disk between forwards
        assert torch.equal(lm.model(IDS), ref)
        assert all(t.is_meta for t in layer0.parameters()) and layer0.attn.wq._w_cache is None
        prompts = ["The capital of France is", "Once upon"]
        want = generate(unsplit, prompts, 6, SamplingConfig(temperature=0.0)).token_ids
        assert generate(lm, prompts, 6, SamplingConfig(temperature=0.0)).token_ids == want
        assert lm.model.layers[1].attn.kv_cache is None  # dropped after generation, as unsplit


def test_native_split_of_a_learned_position_conv1d_model(tiny_models):
    """GPT-2: learned positions in the embed unit, Conv1D weights, tied head, all on disk."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    src = InMemoryKbit(hf, QuantConfig(bits=4, block_size=32, dtype="int"))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = build_model(src, "cpu", backend="native").model(ids)
    lm = build_model(src, "cpu", backend="native", device_map={
        "embed": "disk", "layers.0": "cpu", "layers.1": "disk", "head": "disk"})
    assert all(t.is_meta for t in lm.model.pos_emb.parameters())
    assert torch.equal(lm.model(ids), ref)


def test_transformers_backend_through_accelerate(kbit_dir, tiny_llama_with_tokenizer):
    # accelerate's from_pretrained builds the quantizer's KbitLinears, which hold 16-bit copies on
    # the CPU: compared with the same
    base = load_model(kbit_dir, device="cpu", backend="transformers", cpu_weights="fp16")
    lm = load_model(kbit_dir, device="cpu", backend="transformers", device_map="auto")
    assert "accelerate" in lm.note and torch.equal(lm.model(IDS), base.model(IDS))
    # kbit weights cannot be offloaded to disk by transformers: one clear error
    with pytest.raises(PlacementError, match="disk"):
        load_model(kbit_dir, device="cpu", backend="transformers", device_map="auto", max_memory="cpu=1MB")
    # a plain HF model (an eval baseline) is split by accelerate too
    from kbitrt.eval.model_open import open_model

    plain = open_model(str(tiny_llama_with_tokenizer), device="cpu")
    split = open_model(str(tiny_llama_with_tokenizer), device="cpu", device_map="auto")
    assert torch.equal(split.model(IDS), plain.model(IDS))


def test_cli_run_eval_bench_take_device_maps(kbit_dir, tmp_path):
    runner = CliRunner()
    common = ["-p", "Hello there", "-n", "5", "--greedy", "--device", "cpu", "--json"]
    plain = runner.invoke(cli, ["run", str(kbit_dir), *common])
    split = runner.invoke(cli, ["run", str(kbit_dir), *common, "--device-map", "auto",
                                "--max-memory", "cpu=1MB"])
    assert plain.exit_code == 0 and split.exit_code == 0, split.output
    a, b = json.loads(plain.stdout), json.loads(split.stdout)
    assert a["results"] == b["results"] and "disk" in b["note"]
    bad = runner.invoke(cli, ["run", str(kbit_dir), *common, "--device-map", "auto", "--max-memory", "cpu=huge"])
    assert bad.exit_code == 2 and "not a size" in bad.stderr
    bad = runner.invoke(cli, ["run", str(kbit_dir), *common, "--device-map", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "--device-map" in bad.stderr
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ppl = []
    for extra in ([], ["--device-map", "auto", "--max-memory", "cpu=1MB"]):
        r = runner.invoke(cli, ["eval", str(kbit_dir), "--ppl", str(text), "--seqlen", "64",
                                "--device", "cpu", "--json", "-o", str(tmp_path / "e.json"), *extra])
        assert r.exit_code == 0, r.output
        ppl.append(json.loads(r.stdout)["perplexity"]["t.txt"])
    assert ppl[0]["perplexity"] == ppl[1]["perplexity"] and ppl[0]["tokens"] == ppl[1]["tokens"]
    r = runner.invoke(cli, ["bench", str(kbit_dir), "-p", "8", "-n", "4", "--reps", "1", "--device", "cpu",
                            "--device-map", "auto", "--max-memory", "cpu=1MB", "--json",
                            "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["params"] == json.loads(runner.invoke(cli, [
        "bench", str(kbit_dir), "-p", "8", "-n", "4", "--reps", "1", "--device", "cpu", "--json",
        "-o", str(tmp_path / "b0.json")]).stdout)["params"]


@pytest.mark.gpu
def test_gpu_split_with_cpu_and_disk_offload_matches_one_gpu(kbit_dir):
    """On a GPU: embed and head on cuda:0, one layer offloaded to RAM, one to disk (both run on
    cuda:0); the transformers backend with a layer offloaded to the CPU by accelerate."""
    ids = IDS.cuda()
    one = load_model(kbit_dir, device="cuda", backend="native")
    split = load_model(kbit_dir, device="cuda", backend="native", device_map={
        "embed": 0, "layers.0": "cpu", "layers.1": "disk", "head": 0})
    assert torch.equal(split.model(ids), one.model(ids))
    prompts = ["The capital of France is"]
    assert generate(split, prompts, 8, SamplingConfig(temperature=0.0)).token_ids == \
        generate(one, prompts, 8, SamplingConfig(temperature=0.0)).token_ids
    base = load_model(kbit_dir, device="cuda", backend="transformers")
    mapfile = kbit_dir.parent / "hf-map.json"
    mapfile.write_text(json.dumps({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                                   "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}))
    hf = load_model(kbit_dir, device="cuda", backend="transformers", device_map=str(mapfile))
    torch.testing.assert_close(hf.model(ids), base.model(ids))


@pytest.mark.slow
def test_smollm2_split_over_cpu_and_disk_generates_the_same_tokens(smollm2_nf4):
    """The real model: with a 300 MB CPU budget most decoder layers rest on disk and are read
    back at every forward; greedy tokens and logits equal the unsplit model's."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    one = load_model(smollm2_nf4, device="cpu", backend="native")
    want = generate(one, prompts, 4, SamplingConfig(temperature=0.0)).token_ids
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    ref = one.model(ids)
    del one
    split = load_model(smollm2_nf4, device="cpu", backend="native", device_map="auto",
                       max_memory="cpu=300MB")
    assert "disk" in split.note and "cpu" in split.note
    assert torch.equal(split.model(ids), ref)
    assert generate(split, prompts, 4, SamplingConfig(temperature=0.0)).token_ids == want
