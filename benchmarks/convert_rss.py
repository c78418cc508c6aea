"""Peak resident memory of `kbit convert` on a synthetic multi-GB BLOOM-shaped checkpoint.

Generates (once, streaming, bounded memory) a BLOOM-176B-shaped checkpoint with `--layers` decoder
layers of hidden size 14336 (2.46 B parameters, 4.9 GB in bf16 per layer) and a small vocabulary,
then converts it with `kbit convert` in a child process and reads that process's peak RSS.

    python benchmarks/convert_rss.py --layers 2 --workdir /tmp/kbit-rss     # ~9.9 GB checkpoint

Writes benchmarks/results/convert_rss-cpu.json (device, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kbitrt.format.safetensors_io import PlannedTensor, ShardWriter
from kbitrt.eval.results import git_commit  # noqa: E402

HIDDEN, HEADS, VOCAB = 14336, 112, 1024
ROOT = Path(__file__).resolve().parents[1]


def bloom_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h = HIDDEN
    out = [("transformer.word_embeddings.weight", (VOCAB, h)),
           ("transformer.word_embeddings_layernorm.weight", (h,)),
           ("transformer.word_embeddings_layernorm.bias", (h,)),
           ("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
    for i in range(layers):
        p = f"transformer.h.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
                (p + "self_attention.query_key_value.weight", (3 * h, h)),
                (p + "self_attention.query_key_value.bias", (3 * h,)),
                (p + "self_attention.dense.weight", (h, h)), (p + "self_attention.dense.bias", (h,)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "post_attention_layernorm.bias", (h,)),
                (p + "mlp.dense_h_to_4h.weight", (4 * h, h)), (p + "mlp.dense_h_to_4h.bias", (4 * h,)),
                (p + "mlp.dense_4h_to_h.weight", (h, 4 * h)), (p + "mlp.dense_4h_to_h.bias", (h,))]
    return out


def generate(folder: Path, layers: int) -> int:
    """Write the checkpoint one shard per layer, random rows in 64 MB chunks (never whole tensors)."""
    if (folder / "model.safetensors.index.json").exists():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "hidden_size": HIDDEN,
              "n_head": HEADS, "n_layer": layers, "vocab_size": VOCAB, "dtype": "bfloat16",
              "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tensors = bloom_tensors(layers)
    groups: dict[str, list] = {}
    for name, shape in tensors:
        layer = name.split(".")[2] if ".h." in name else "rest"
        groups.setdefault(layer, []).append((name, shape))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for gi, (layer, items) in enumerate(sorted(groups.items())):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(tmp / fname, [PlannedTensor(n, "BF16", s) for n, s in items], {"format": "pt"})
        for name, shape in items:
            weight_map[name] = fname
            if len(shape) == 1:
                w.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
                continue
            step = max(1, (1 << 25) // shape[1])
            for r0 in range(0, shape[0], step):
                r1 = min(shape[0], r0 + step)
                chunk = (torch.randn(r1 - r0, shape[1], generator=gen) * 0.02).to(torch.bfloat16)
                w.write(name, chunk, r0 * shape[1] * 2)
        w.close()
        print(f"  wrote {fname}", file=sys.stderr)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kbit-rss"))
    ap.add_argument("--args", default="--bits 4 --block 64 --dtype nf", help="kbit convert options")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convert_rss-cpu.json")
    a = ap.parse_args()
    src, dst = a.workdir / f"bloom-shaped-{a.layers}l", a.workdir / "converted"
    t0 = time.perf_counter()
    size = generate(src, a.layers)
    print(f"checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    # the commit of the code that runs (read before, not after, the long conversion)
    commit = git_commit() or "unknown"
    kbit = [sys.executable, "-m", "kbitrt.cli", "convert", str(src), "-o", str(dst), "--force", "--json",
            *a.args.split()]
    t0 = time.perf_counter()
    proc = subprocess.run(kbit, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"kbit convert failed:\n{proc.stderr}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = json.loads(proc.stdout)
    import kbitrt
    result = {
        "benchmark": "convert_rss", "checkpoint_bytes": size, "layers": a.layers, "hidden": HIDDEN,
        "convert_args": a.args, "peak_rss_bytes": peak_rss, "peak_rss_gb": round(peak_rss / 1e9, 3),
        "target_gb": 2.0, "pass": peak_rss < 2e9, "seconds": round(seconds, 1),
        "input_gb_per_s": round(size / seconds / 1e9, 3), "summary": summary,
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "kbitrt": kbitrt.__version__},
        "commit": commit, "date": time.strftime("%Y-%m-%d"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("checkpoint_bytes", "peak_rss_gb", "pass", "seconds")}))
    shutil.rmtree(dst, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
