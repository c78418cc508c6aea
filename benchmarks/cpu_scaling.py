"""kbit vs llama.cpp on the CPU from 135M to 8B: decode tg128, prefill pp512, peak RSS, file size.

    python benchmarks/cpu_scaling.py --sizes 135m,1.1b --threads 2 --reps 3

Random-weight Llama models with the shapes of SmolLM2-135M, TinyLlama-1.1B, Llama-3.2-3B and
Llama-3-8B, all with SmolLM2's tokenizer (vocabulary 49152: the 3B's and 8B's heads are smaller
than the real ones, 128256). The same fp16 weights go to each runtime: kbit (nf4-b64 as `kbit
convert` writes it: the head and the embedding as int8), kbit-h16 (both kept in 16 bits), and
kbit-qhead (both at `--head-bits/--embedding-bits`)
and llama.cpp (a GGUF written here with the `gguf` package, q and k permuted as llama.cpp's own
converter does, then quantized by llama-cpp-python's `llama_model_quantize` to Q4_0 and Q4_K_M;
llama.cpp keeps the output head in Q6_K there). The 8B runs at full width with fewer layers
(`--layers 8b=4`); its figures are reported as measured and extrapolated to the full depth by the
bytes each runtime reads per token (layers' bytes scaled, head and embedding's kept).

Every measurement is one subprocess (its own memory: RSS after imports, peak RSS), reps
alternating between runtimes; decode is 128 single-token steps after a 16-token prompt on fixed
random token ids (no sampling in either runtime), prefill one 512-token batch into an empty
cache. Models are built once under --workdir and reused. Writes
benchmarks/results/cpu_scaling-<threads>threads.json (machine, versions, commit, load averages)
and prints the Markdown table of docs/cpu.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_decode import machine, peak, rss, versions  # noqa: E402
from cpu_memory_breakdown import worker_result  # noqa: E402
from kbitrt.format.config import HEAD_BITS_DEFAULT, HEAD_DTYPE_AT_8  # noqa: E402

VOCAB = 49152
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, tied
    "135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, tied=True),
    "1.1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, tied=False),
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, tied=True),
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, tied=False),
}
DEFAULT_LAYERS = {"8b": 4}  # full width, fewer layers: extrapolated (see the docstring)
RUNTIMES = ("kbit", "kbit-h16", "kbit-qhead", "llama.cpp-Q4_0", "llama.cpp-Q4_K_M")
PROMPT, NEW, PREFILL = 16, 128, 512


# ------------------------------------------------------------------------------- the models

def hf_config(size: str, layers: int):
    from transformers import LlamaConfig

    s = SHAPES[size]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_hidden_layers=layers, num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], max_position_embeddings=2048,
                       rope_theta=10000.0, tie_word_embeddings=s["tied"], rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2)


def layer_tensors(config, i: int) -> dict[str, tuple[int, ...]]:
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,)}


def make_hf(size: str, layers: int, folder: Path) -> Path:
    """A random fp16 Llama checkpoint, one shard per layer (never the whole model in memory),
    with SmolLM2's tokenizer."""
    import torch
    from safetensors.torch import save_file

    from kbitrt.convert.gguf import ensure_smollm2

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(size, layers)
    g = torch.Generator().manual_seed(0)
    h = config.hidden_size
    groups = [{"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,),
               **({} if config.tie_word_embeddings else {"lm_head.weight": (VOCAB, h)})}]
    groups += [layer_tensors(config, i) for i in range(layers)]
    weight_map = {}
    for n, group in enumerate(groups):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).half()
                   for k, s in group.items()}
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.dtype = "float16"
    config.save_pretrained(tmp)
    smol = ensure_smollm2()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / f).exists():
            shutil.copyfile(smol / f, tmp / f)
    tmp.rename(folder)
    return folder


def _permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf permutation of q and k rows (its rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def gguf_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    i, rest = key.removeprefix("model.layers.").split(".", 1)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def make_gguf_f16(hf: Path, out: Path) -> Path:
    """The HF folder's weights as an F16 GGUF (llama arch, SmolLM2's tokenizer), streamed."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from kbitrt.convert.gguf import GGUF_NAME, gguf_dir

    cfg = json.loads((hf / "config.json").read_text())
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("random"), w.add_context_length(2048), w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"]), w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"]), w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"]), w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16), w.add_vocab_size(VOCAB)
    src = gguf.GGUFReader(gguf_dir() / GGUF_NAME)
    for key, field in src.fields.items():  # SmolLM2's tokenizer, as its GGUF holds it
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    arrays = {}
    order = sorted(index, key=lambda k: (k.count("layers"), k))
    for key in order:
        with safe_open(hf / index[key], "np") as f:
            info = f.get_slice(key)
            shape, dtype = info.get_shape(), np.float16 if len(info.get_shape()) == 2 else np.float32
        arrays[key] = (shape, dtype)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(gguf_name(key), shape, np.dtype(dtype), nbytes)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()
    for key in order:
        with safe_open(hf / index[key], "np") as f:
            t = f.get_tensor(key).astype(arrays[key][1])
        if key.endswith("q_proj.weight"):
            t = _permute(t, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            t = _permute(t, cfg["num_key_value_heads"])
        w.write_tensor_data(t)
    w.close()
    return out


def quantize_gguf(f16: Path, out: Path, ftype: str) -> Path:
    import llama_cpp

    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    tmp = out.with_name(out.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed ({rc})")
    tmp.rename(out)
    return out


def make_kbit(hf: Path, out: Path, head_bits: int | None, embedding_bits: int | None,
              head_dtype: str | None = None) -> Path:
    from kbitrt.convert.converter import convert
    from kbitrt.format.config import QuantConfig

    if not (out / "config.json").exists():
        convert(hf, out, QuantConfig(bits=4, block_size=64, dtype="nf", head_bits=head_bits,
                                     embedding_bits=embedding_bits, head_dtype=head_dtype))
    return out


def prepare(args, size: str, layers: int) -> dict[str, Path]:
    """Every runtime's model of `size`, built once under the workdir."""
    base = Path(args.workdir) / f"{size}-L{layers}"
    hf = make_hf(size, layers, base / "hf")
    default = HEAD_BITS_DEFAULT  # what `kbit convert` writes unless told otherwise
    widths = {"kbit": (default, default, HEAD_DTYPE_AT_8), "kbit-h16": (None, None, None),
              "kbit-qhead": (args.head_bits, args.embedding_bits, None)}
    paths = {name: make_kbit(hf, base / ("kbit-nf4-b64" + (f"-h{h}e{e}" if h else "") +
                                         (f"-{t}" if t else "")), h, e, t)
             for name, (h, e, t) in widths.items() if name in args.runtimes.split(",")}
    wanted = [r.split("-", 1)[1] for r in args.runtimes.split(",") if r.startswith("llama.cpp-")]
    missing = [t for t in wanted if not (base / f"{t}.gguf").exists()]
    if missing:
        f16 = make_gguf_f16(hf, base / "f16.gguf.tmp")
        for t in missing:
            quantize_gguf(f16, base / f"{t}.gguf", t)
        f16.unlink()
    paths.update({f"llama.cpp-{t}": base / f"{t}.gguf" for t in wanted})
    return paths


# ----------------------------------------------------------------------------------- workers

def token_ids(n: int) -> list[int]:
    import random

    r = random.Random(0)
    return [r.randrange(3, VOCAB) for _ in range(n)]


def worker_kbit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from kbitrt.model.families import hf_config as config_of
    from kbitrt.runtime.generate import decode_step
    from kbitrt.runtime.kernels.cpu import available
    from kbitrt.runtime.loader import load_model

    config_of(json.loads((Path(args.model) / "config.json").read_text()))  # imports, not model
    available()
    rss0 = rss()
    lm = load_model(args.model, device="cpu")
    step, _ = decode_step(lm, False)
    model = lm.model
    ids = torch.tensor([token_ids(PREFILL + NEW)])

    @torch.no_grad()
    def prefill(n: int) -> float:
        model.setup_caches(1, n + 1)
        try:
            t0 = time.perf_counter()
            model(ids[:, :n], torch.arange(n), last_only=True)
            return n / (time.perf_counter() - t0)
        finally:
            model.drop_caches()

    @torch.no_grad()
    def decode(n: int) -> float:
        model.setup_caches(1, PROMPT + n + 1)
        try:
            model(ids[:, :PROMPT], torch.arange(PROMPT), last_only=True)
            pos = torch.tensor([PROMPT])
            t0 = time.perf_counter()
            for i in range(n):
                pos.fill_(PROMPT + i)
                step(ids[:, PROMPT + i: PROMPT + i + 1], pos)
            return n / (time.perf_counter() - t0)
        finally:
            model.drop_caches()

    prefill(32), decode(4)  # warm-up
    return {"prefill_tok_s": prefill(PREFILL), "decode_tok_s": decode(NEW),
            "rss_after_imports": rss0, "cpu_weights": lm.cpu_weights}


def worker_llama_cpp(args) -> dict:
    import llama_cpp

    rss0 = rss()
    llm = llama_cpp.Llama(model_path=str(args.model), n_threads=args.threads,
                          n_threads_batch=args.threads, n_ctx=1024, n_batch=PREFILL,
                          n_ubatch=PREFILL, verbose=False, seed=0)
    ids = token_ids(PREFILL + NEW)

    def prefill(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n])
        return n / (time.perf_counter() - t0)

    def decode(n: int) -> float:
        llm.reset()
        llm.eval(ids[:PROMPT])
        t0 = time.perf_counter()
        for i in range(n):
            llm.eval(ids[PROMPT + i: PROMPT + i + 1])
        return n / (time.perf_counter() - t0)

    prefill(32), decode(4)  # warm-up
    return {"prefill_tok_s": prefill(PREFILL), "decode_tok_s": decode(NEW),
            "rss_after_imports": rss0, "llama_cpp_python": llama_cpp.__version__}


def worker(args) -> None:
    out = worker_llama_cpp(args) if args.worker.startswith("llama.cpp") else worker_kbit(args)
    out["peak_rss"] = peak()
    print("RESULT " + json.dumps(out), flush=True)


def run_one(args, name: str, model: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", str(model),
           "--threads", str(args.threads)]
    return worker_result(cmd, args.threads, args.timeout)


# -------------------------------------------------------------------------------------- main

def file_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors")) if model.is_dir() \
        else model.stat().st_size


def layer_bytes(model: Path) -> int:
    """Bytes of the decoder layers' tensors (the rest: embedding, head, final norm)."""
    if not model.is_dir():
        import gguf

        return sum(int(t.n_bytes) for t in gguf.GGUFReader(model).tensors if t.name.startswith("blk."))
    total = 0
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k.startswith("model.layers."))
    return total


def summarise(reps: list[dict], model: Path, layers: int, full_layers: int) -> dict:
    ok = [r for r in reps if "error" not in r]
    if not ok:
        return {"error": reps[-1].get("error")}
    size, per_layer = file_bytes(model), layer_bytes(model) / layers
    out = {"file_bytes": size, "layer_bytes": per_layer * layers, "reps": ok,
           "peak_rss_mb": max(r["peak_rss"] for r in ok) / 2**20,
           "model_memory_mb": max(r["peak_rss"] - r["rss_after_imports"] for r in ok) / 2**20}
    for key in ("decode_tok_s", "prefill_tok_s"):
        vals = [r[key] for r in ok]
        out[key] = statistics.median(vals)
        out[f"{key}_range"] = [min(vals), max(vals)]
    if layers != full_layers:  # bytes per token at the full depth: layers scaled, the rest kept
        full = size + per_layer * (full_layers - layers)
        out["extrapolated"] = {"layers": full_layers, "file_bytes": full,
                               **{k: out[k] * size / full for k in ("decode_tok_s", "prefill_tok_s")}}
    return out


def ratios(res: dict) -> dict:
    base = res.get("llama.cpp-Q4_0", {})
    out = {}
    for name, r in res.items():
        if name.startswith("kbit") and "decode_tok_s" in r and "decode_tok_s" in base:
            out[name] = {"decode_vs_q4_0": r["decode_tok_s"] / base["decode_tok_s"],
                         "prefill_vs_q4_0": r["prefill_tok_s"] / base["prefill_tok_s"],
                         "model_memory_vs_q4_0": r["model_memory_mb"] / base["model_memory_mb"]}
    return out


def markdown(record: dict) -> str:
    lines = ["| size | runtime | file (MB) | decode tok/s (tg128) | prefill tok/s (pp512) | "
             "peak RSS (MB) | model memory (MB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for size, entry in record["sizes"].items():
        for name, r in entry["results"].items():
            if "error" in r:
                lines.append(f"| {size} | {name} | | error: {r['error'][:60]} | | | |")
                continue
            q = entry["ratios"].get(name, {})
            dec = f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_range'][0]:.1f}-{r['decode_tok_s_range'][1]:.1f})"
            pre = f"{r['prefill_tok_s']:.1f} ({r['prefill_tok_s_range'][0]:.1f}-{r['prefill_tok_s_range'][1]:.1f})"
            if q:
                dec += f": **{q['decode_vs_q4_0']:.2f}x**"
                pre += f": **{q['prefill_vs_q4_0']:.2f}x**"
            if "extrapolated" in r:
                e = r["extrapolated"]
                dec += f"; {e['layers']} layers ≈ {e['decode_tok_s']:.1f}"
                pre += f"; ≈ {e['prefill_tok_s']:.1f}"
            lines.append(f"| {size} (L{entry['layers']}) | {name} | {r['file_bytes'] / 1e6:.0f} | {dec} | "
                         f"{pre} | {r['peak_rss_mb']:.0f} | {r['model_memory_mb']:.0f} |")
    return "\n".join(lines)


def parse_layers(text: str) -> dict[str, int]:
    out = dict(DEFAULT_LAYERS)
    for item in filter(None, (text or "").split(",")):
        size, _, n = item.partition("=")
        out[size] = int(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="135m,1.1b", help=f"of {','.join(SHAPES)}")
    ap.add_argument("--layers", default="", help="SIZE=N,...: fewer layers at full width "
                    f"(default {DEFAULT_LAYERS}), extrapolated to the full depth")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtimes", default="kbit,kbit-h16,llama.cpp-Q4_0",
                    help=f"of {','.join(RUNTIMES)}")
    # 6: llama.cpp's Q4_0/Q4_K_M head is Q6_K; on the CPU a 6-bit head GEMV is ~2x faster than
    # the 16-bit one, an 8-bit one slower (head_bits_smollm2-cpu.json, head_gemv)
    ap.add_argument("--head-bits", type=int, default=6, help="kbit-qhead's --head-bits")
    ap.add_argument("--embedding-bits", type=int, default=6, help="kbit-qhead's --embedding-bits")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("KBIT_CACHE", Path.home() / ".cache/kbitrt"))
                                             / "cpu-scaling"))
    ap.add_argument("--prepare-only", action="store_true", help="build the models, time nothing")
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per measurement")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    layers = parse_layers(args.layers)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = Path(args.output or ROOT / f"benchmarks/results/cpu_scaling-{args.threads}threads.json")
    record = {"kind": "cpu_scaling", "machine": machine(), "cores": os.cpu_count(),
              "threads": args.threads, "reps": args.reps, "prompt_tokens": PROMPT,
              "decode_tokens": NEW, "prefill_tokens": PREFILL, "vocab": VOCAB,
              "kbit": {"quantization": "nf4-b64", "head_bits": HEAD_BITS_DEFAULT,
                       "embedding_bits": HEAD_BITS_DEFAULT, "head_dtype": HEAD_DTYPE_AT_8, "kbit-h16": "16-bit head and embedding",
                       "qhead": {"head_bits": args.head_bits, "embedding_bits": args.embedding_bits}},
              "versions": versions(("torch", "transformers", "llama-cpp-python", "gguf", "kbitrt")),
              "commit": commit, "argv": sys.argv, "loadavg_start": os.getloadavg(), "sizes": {}}
    names = args.runtimes.split(",")
    for size in args.sizes.split(","):
        n_layers = layers.get(size, SHAPES[size]["layers"])
        t0 = time.perf_counter()
        paths = prepare(args, size, n_layers)
        print(f"{size}: models ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.prepare_only:
            continue
        reps: dict[str, list] = {n: [] for n in names}
        for rep in range(args.reps):  # alternating: every runtime once per round
            for name in names:
                reps[name].append(run_one(args, name, paths[name]))
                print(f"  {size} rep {rep} {name}: {json.dumps(reps[name][-1])[:200]}",
                      file=sys.stderr, flush=True)
            results = {n: summarise(reps[n], paths[n], n_layers, SHAPES[size]["layers"]) for n in names}
            record["sizes"][size] = {"layers": n_layers, "full_layers": SHAPES[size]["layers"],
                                     "shape": SHAPES[size], "rounds": rep + 1, "results": results,
                                     "ratios": ratios(results)}
            record["loadavg_end"] = os.getloadavg()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2) + "\n")  # after each round: partial runs count
    if record["sizes"]:
        print(markdown(record))
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
