"""Load time of a kbit model: kbitrt's loader vs transformers' from_pretrained, vs fp16 in transformers.

    python benchmarks/load_time.py [--repeats 3] [--bits 4 --block 64]

Model: SmolLM2-135M-Instruct (kbitrt.convert.gguf), converted once to a kbit folder and saved once as
fp16, both cached under ~/.cache/kbitrt/bench. Every load runs in this process after one untimed
load of each (imports done, files in the page cache), so the numbers are warm-cache load times;
GB/s is bytes on disk / seconds. kbitrt's loader runs one token through the model as part of
loading (on the CPU that builds the dequantized-weight cache); for transformers that first forward
is timed separately. Writes benchmarks/results/load_time-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import kbitrt  # noqa: F401  (registers the kbit quantizer with transformers)
from kbitrt.eval.results import environment

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "kbitrt" / "bench"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def prepare(bits: int, block: int) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig
    from kbitrt.convert.gguf import ensure_smollm2

    src = ensure_smollm2()
    kbit_dir = CACHE / f"SmolLM2-135M-nf{bits}-b{block}"
    if not (kbit_dir / "config.json").exists():
        convert(src, kbit_dir, QuantConfig(bits=bits, block_size=block, dtype="nf"), force=True)
    fp16_dir = CACHE / "SmolLM2-135M-fp16"
    if not (fp16_dir / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
        model.save_pretrained(fp16_dir)
        AutoTokenizer.from_pretrained(src).save_pretrained(fp16_dir)
    return kbit_dir, fp16_dir


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """(load seconds, first-forward seconds) per repeat, after one untimed warm-up."""
    ids = torch.tensor([[1, 2, 3, 4]])
    fn()
    loads, firsts = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        model = fn()
        t1 = time.perf_counter()
        if hasattr(model, "generate"):  # a transformers model: its first forward, timed apart
            with torch.no_grad():
                model(ids)
            firsts.append(time.perf_counter() - t1)
        loads.append(t1 - t0)
        del model
    return loads, firsts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_time-cpu.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from kbitrt.runtime.loader import load_model

    kbit_dir, fp16_dir = prepare(args.bits, args.block)
    cases = {
        "kbitrt load_model (native, incl. 1-token warm-up)":
            (kbit_dir, lambda: load_model(kbit_dir, device="cpu", backend="native")),
        "transformers from_pretrained (kbit)":
            (kbit_dir, lambda: AutoModelForCausalLM.from_pretrained(kbit_dir)),
        "transformers from_pretrained (fp16)":
            (fp16_dir, lambda: AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=torch.float16)),
    }
    rows = []
    for name, (path, fn) in cases.items():
        loads, firsts = timed(fn, args.repeats)
        size = folder_bytes(path)
        med = statistics.median(loads)
        rows.append({"case": name, "path": str(path), "bytes": size, "seconds_median": med,
                     "seconds": loads, "gb_per_s": size / med / 1e9,
                     "first_forward_seconds_median": statistics.median(firsts) if firsts else None})
        print(f"{name:52s} {size / 1e6:8.1f} MB  {med:7.3f} s  {size / med / 1e9:6.3f} GB/s"
              + (f"  first forward {statistics.median(firsts):.3f} s" if firsts else ""))
    record = {"kind": "load_time", **environment(torch.device("cpu")),
              "model": "SmolLM2-135M-Instruct", "quantization": f"nf{args.bits}-b{args.block}",
              "repeats": args.repeats, "cache": "warm (one untimed load first)", "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
