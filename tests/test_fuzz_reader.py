"""Seeded mutations of a converted tiny folder of each packing (bitslice-v1 and the any-precision
bitplane-v1), each loaded through the public API (open with verification, build, forward) and the
CLI (`kbit inspect --json --verify`): every one must end in a clean one-line error or in output
identical to the unmutated folder's. Counts: 0 unexpected exception types, 0 silent acceptances (a
load that gives other logits or another summary), 0 hangs. Data mutations (flipped bytes, swapped
planes) are caught by the per-tensor CRC-32; value mutations that also fix the CRC (a NaN codebook
entry, unsorted outlier indices, a NaN block scale) by the value checks.

The seed changes per run (KBIT_FUZZ_SEED=N reproduces one; it is printed and in every failure)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kbitrt.cli.main import cli
from kbitrt.convert.any_precision import convert_any_precision
from kbitrt.convert.converter import convert
from kbitrt.errors import KbitError
from kbitrt.format.bitplane import AnyPrecisionConfig
from kbitrt.format.config import OutlierSpec, QuantConfig
from kbitrt.format.reader import KbitModel
from kbitrt.runtime.loader import build_model

from conftest import make_tiny_model

N_MUTATIONS = 500
SEED = int(os.environ.get("KBIT_FUZZ_SEED") or time.time_ns() % 1_000_000)
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 3]])
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]


# -- safetensors files as (header dict, data bytes) ---------------------------------------------

def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def write_st(path: Path, header, data: bytes, *, raw_header: bytes | None = None) -> None:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def tensors_of(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# -- mutations: each takes (folder, rng) and returns a short description ------------------------

def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _pick_tensor(folder, rng):
    path = rng.choice(shards(folder))
    header, data = read_st(path)
    return path, header, data, rng.choice(tensors_of(header))


def m_dtype(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    old = h[name]["dtype"]
    h[name]["dtype"] = rng.choice([t for t in DTYPES if t != old] + ["F8", 7, None, "f16"])
    write_st(path, h, d)
    return f"dtype {name} {old}->{h[name]['dtype']}"


def m_dtype_same_size(folder, rng):  # the silent kind: a relabel that keeps the byte size
    same = {"F16": ["BF16", "I16"], "BF16": ["F16", "I16"], "F32": ["I32"], "I64": ["F64"],
            "U8": ["I8", "BOOL"], "I32": ["F32"], "F64": ["I64"]}
    path, h, d, name = _pick_tensor(folder, rng)
    old = h[name]["dtype"]
    h[name]["dtype"] = rng.choice(same.get(old, ["F32"]))
    write_st(path, h, d)
    return f"relabel {name} {old}->{h[name]['dtype']}"


def m_shape(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    shape = list(h[name]["shape"])
    kind = rng.randrange(7)
    if kind == 0 and shape:
        i = rng.randrange(len(shape))
        shape[i] += rng.choice([-1, 1, 2])
    elif kind == 1 and len(shape) == 2:
        shape = shape[::-1]
    elif kind == 2:
        shape = shape + [1]
    elif kind == 3 and len(shape) >= 1:
        shape = [-shape[0]] + shape[1:]
    elif kind == 4:
        shape = [True] * len(shape) or [True]
    elif kind == 5 and len(shape) == 2:  # the same number of elements, another shape
        shape = [shape[0] * shape[1]]
    else:
        shape = "64"
    h[name]["shape"] = shape
    write_st(path, h, d)
    return f"shape {name} -> {shape}"


def m_offsets(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    b, e = h[name]["data_offsets"]
    others = [t for t in tensors_of(h) if t != name]
    kind = rng.randrange(7)
    if kind == 0:
        b, e = b - 8, e - 8
    elif kind == 1:
        b, e = b + 2, e + 2
    elif kind == 2:
        b, e = -(e - b), 0
    elif kind == 3 and others:  # share another tensor's bytes
        o = h[rng.choice(others)]["data_offsets"]
        b, e = o[0], o[0] + (e - b)
    elif kind == 4:
        b, e = e, b
    elif kind == 5:
        b, e = float(b), float(e)
    else:
        b, e = b, e + len(d) + 100
    h[name]["data_offsets"] = [b, e]
    write_st(path, h, d)
    return f"offsets {name} -> {[b, e]}"


def m_swap_offsets(folder, rng):  # two same-size tensors exchange bytes: valid bytes, wrong data
    path = rng.choice(shards(folder))
    h, d = read_st(path)
    by_size: dict[int, list[str]] = {}
    for t in tensors_of(h):
        b, e = h[t]["data_offsets"]
        by_size.setdefault(e - b, []).append(t)
    pairs = [v for v in by_size.values() if len(v) >= 2]
    if not pairs:
        return m_offsets(folder, rng)
    a, b = rng.sample(rng.choice(pairs), 2)
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    write_st(path, h, d)
    return f"swap bytes {a} <-> {b}"


def m_drop_entry(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    del h[name]
    write_st(path, h, d)
    return f"drop header entry {name}"


def m_rename(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    module, _, leaf = name.rpartition(".")
    new = rng.choice([f"{module}.{leaf}_x", f"{module}.outlier_weight", f"{module}.absmax_scale",
                      f"x{name}", name.replace("layers.1", "layers.7"), f"{module}.weight",
                      f"{module}.codebook"])
    if new in h:
        new = new + "2"
    h[new] = h.pop(name)
    write_st(path, h, d)
    return f"rename {name} -> {new}"


def m_duplicate_key(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    text = json.dumps(h)
    entry = json.dumps({name: h[name]})[1:-1]
    write_st(path, None, d, raw_header=(text[:-1] + ", " + entry + "}").encode())
    return f"duplicate key {name}"


def m_entry_junk(folder, rng):
    path, h, d, name = _pick_tensor(folder, rng)
    kind = rng.randrange(4)
    if kind == 0:
        h[name]["extra"] = 1
    elif kind == 1:
        del h[name]["shape"]
    elif kind == 2:
        h[name] = [h[name]["dtype"]]
    else:
        h[name]["data_offsets"] = h[name]["data_offsets"][:1]
    write_st(path, h, d)
    return f"malformed entry {name} ({kind})"


def m_metadata(folder, rng):
    path = rng.choice(shards(folder))
    h, d = read_st(path)
    meta = h.get("__metadata__", {})
    kind = rng.randrange(8)
    if kind == 6:  # the checksums dropped: an older kbitrt's file, same data (identical)
        meta.pop("kbit_crc32", None)
    elif kind == 7:
        sums = json.loads(meta["kbit_crc32"])
        sums[rng.choice(sorted(sums))] = rng.choice(["xyz", 5, "0000000g", "123"])
        meta["kbit_crc32"] = json.dumps(sums)
    elif kind == 0:
        meta.pop("kbit", None)
    elif kind == 1:
        k = json.loads(meta["kbit"])
        k["bits"] = rng.choice([3, 5, 8])
        meta["kbit"] = json.dumps(k)
    elif kind == 2:
        k = json.loads(meta["kbit"])
        k[rng.choice(["dtype", "block_size", "format_version", "absmax_dtype"])] = \
            rng.choice(["int", 128, 2, "fp32", True])
        meta["kbit"] = json.dumps(k)
    elif kind == 3:
        meta["kbit"] = "{not json"
    elif kind == 4:
        meta["x"] = 5
    else:
        h["__metadata__"] = ["format", "pt"]
        write_st(path, h, d)
        return "metadata is a list"
    h["__metadata__"] = meta
    write_st(path, h, d)
    return f"metadata ({kind})"


def m_header_len(folder, rng):
    path = rng.choice(shards(folder))
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    new = rng.choice([n - 1, n + 1, n + 8, 0, 1, len(raw), 2**62, n // 2])
    raw[:8] = struct.pack("<Q", new)
    path.write_bytes(bytes(raw))
    return f"header length {n}->{new}"


def m_header_bytes(folder, rng):
    path = rng.choice(shards(folder))
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    i = 8 + rng.randrange(n)
    raw[i] = rng.choice([0xFF, 0x00, ord("{"), ord('"'), ord("x"), 0xC3])
    path.write_bytes(bytes(raw))
    return f"header byte {i}"


def m_header_whitespace(folder, rng):  # a re-serialised header: same meaning, other bytes
    path = rng.choice(shards(folder))
    h, d = read_st(path)
    items = list(h.items())
    rng.shuffle(items)
    write_st(path, None, d, raw_header=json.dumps(dict(items), indent=rng.choice([None, 1])).encode())
    return "header re-serialised (identical meaning)"


def m_truncate(folder, rng):
    path = rng.choice(shards(folder))
    raw = path.read_bytes()
    cut = rng.choice([0, 4, 8, 12, len(raw) // 2, len(raw) - 1, len(raw) - rng.randrange(1, 64)])
    path.write_bytes(raw[:cut])
    return f"truncate {path.name} at {cut}"


def m_trailing(folder, rng):
    path = rng.choice(shards(folder))
    with open(path, "ab") as f:
        f.write(bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 100]))))
    return f"trailing bytes on {path.name}"


def m_files(folder, rng):
    kind = rng.randrange(9)
    if kind == 0:
        victim = rng.choice(shards(folder))
        victim.unlink()
        return f"delete {victim.name}"
    if kind == 1:
        (folder / "config.json").unlink()
        return "delete config.json"
    if kind == 2 and (folder / "model.safetensors.index.json").exists():
        (folder / "model.safetensors.index.json").unlink()
        return "delete index"
    if kind == 3:
        shutil.copyfile(shards(folder)[0], folder / "model-extra.safetensors")
        return "extra unindexed shard (identical)"
    if kind == 4:
        (folder / "notes.txt").write_text("hello")
        return "extra file (identical)"
    if kind == 5:
        (folder / "README.md").unlink(missing_ok=True)
        return "README removed (identical)"
    if kind == 6:
        (folder / "config.json").write_bytes(b"\xff\xfe{bad")
        return "config not UTF-8"
    if kind == 7:
        (folder / "config.json").write_text("[1, 2]")
        return "config is a list"
    shard = rng.choice(shards(folder))
    shard.unlink()
    shard.mkdir()
    return f"{shard.name} is a folder"


def m_index(folder, rng):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    wm = data["weight_map"]
    name = rng.choice(sorted(wm))
    kind = rng.randrange(6)
    files = sorted(set(wm.values()))
    if kind == 0:
        wm[name] = next(f for f in files if f != wm[name])
    elif kind == 1:
        del wm[name]
    elif kind == 2:
        wm[name] = "../escape.safetensors"
    elif kind == 3:
        wm["model.ghost.weight"] = files[0]
    elif kind == 4:
        data["weight_map"] = list(wm)
    else:
        wm[name] = 3
    index.write_text(json.dumps(data))
    return f"index ({kind}) {name}"


def _tensor_bytes(folder, rng, want=None):
    """(path, header, data, name, begin, end) of a random tensor (suffix in `want` if given)."""
    path = rng.choice(shards(folder))
    h, d = read_st(path)
    names = [t for t in tensors_of(h) if want is None or t.rpartition(".")[2] in want]
    if not names:
        return None
    name = rng.choice(names)
    b, e = h[name]["data_offsets"]
    return path, h, d, name, b, e


def _fix_crc(h, d, name):
    b, e = h[name]["data_offsets"]
    sums = json.loads(h["__metadata__"]["kbit_crc32"])
    sums[name] = f"{zlib.crc32(d[b:e]):08x}"
    h["__metadata__"]["kbit_crc32"] = json.dumps(sums, separators=(",", ":"), sort_keys=True)


def m_data(folder, rng):  # bytes changed under a valid header: only the CRC-32 sees it
    picked = _tensor_bytes(folder, rng)
    path, h, d, name, b, e = picked
    if e == b:
        return m_offsets(folder, rng)
    d = bytearray(d)
    kind = rng.randrange(3)
    if kind == 0 or e - b < 2:
        i = rng.randrange(b, e)
        d[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and name.endswith(".qweight") and len(h[name]["shape"]) == 3:
        p, rest = h[name]["shape"][0], (e - b) // h[name]["shape"][0]  # two planes exchanged
        i, j = rng.sample(range(p), 2)
        a, c = d[b + i * rest: b + (i + 1) * rest], d[b + j * rest: b + (j + 1) * rest]
        d[b + i * rest: b + (i + 1) * rest], d[b + j * rest: b + (j + 1) * rest] = c, a
        if a == c:
            d[b] ^= 1
    else:
        half = (e - b) // 2
        d[b:b + half], d[e - half:e] = d[e - half:e], d[b:b + half]
        if d[b:b + half] == d[e - half:e]:
            d[b] ^= 1
    write_st(path, h, bytes(d))
    return f"data ({kind}) {name}"


def m_values(folder, rng):  # a bad value with its CRC-32 fixed: the value checks must see it
    picked = _tensor_bytes(folder, rng, {"codebook", "outlier_idx", "absmax", "weight_shape"})
    if picked is None:
        return m_data(folder, rng)
    path, h, d, name, b, e = picked
    suffix = name.rpartition(".")[2]
    dtype = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "U8": torch.uint8}
    t = torch.frombuffer(bytearray(d[b:e]), dtype=dtype[h[name]["dtype"]]).clone()
    if suffix == "codebook":
        i = rng.randrange(t.numel())
        t[i] = rng.choice([float("nan"), float("inf"), 1.5, -3.0])
    elif suffix == "outlier_idx":
        if t.numel() >= 2 and rng.random() < 0.5:
            t[0], t[1] = t[1].item(), t[0].item()
        else:
            t[-1] = rng.choice([-1, 10**6])
    elif suffix == "weight_shape":
        t[rng.randrange(2)] = rng.choice([0, -5, 2**40])
    elif t.dtype == torch.uint8:  # dq8 codes: every byte is a valid code; flip the CRC instead
        t[0] ^= 1
    else:
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("-inf"), -1.0])
    d = d[:b] + t.numpy().tobytes() + d[e:]
    _fix_crc(h, d, name)
    write_st(path, h, d)
    return f"value {name}"


QC_MUTATIONS = [
    ("bits", [True, "4", 4.0, 4.7, 9, 2, None, 5]), ("block_size", [True, 63, 32.0, "32", 8192, 64]),
    ("dtype", ["foo", "int", 4, None]), ("format_version", [True, 2, "1", 1.0, None, 0]),
    ("packing", ["bitplanes", None, 1]), ("absmax_dtype", ["fp32", "dq8", "bf16", 16]),
    ("outliers", ["zscore:x", 5, "top:2%", "none", "top:.%", ""]),
    ("quantize_head", [1, "yes", True, None]), ("exponent_bits", [2, True, "2"]),
    ("transposed_modules", [["model.layers.0.mlp.up_proj"], "x", [1], ["nope"], None]),
    ("modules_not_quantized", [["model.layers.0.mlp.up_proj"], [3], "lm_head"]),
    ("quant_method", ["bnb", None]), ("unknown_key", [1]),
]
CONFIG_MUTATIONS = [
    ("hidden_size", [32, 128, "64", True, 0, -64, 64.0]), ("num_hidden_layers", [1, 3, True, "2"]),
    ("vocab_size", [127, 129, 256, False]), ("intermediate_size", [95, 97, "96"]),
    ("num_attention_heads", [2, 8, True]), ("num_key_value_heads", [1, 4, "2"]),
    ("tie_word_embeddings", [False, "true", 1]), ("dtype", ["float32", "bfloat16", None, 16]),
    ("model_type", ["gpt2", "no-such-model", 3]),
    ("rope_parameters", [{"rope_type": "no-such-rope", "rope_theta": 10000.0}, "x"]),
    ("quantization_config", [None, [], "kbit"]),
]


def _set_qc(folder, rng, choices) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    key, values = rng.choice(choices)
    value = rng.choice(values)
    if value is None:
        cfg["quantization_config"].pop(key, None)
    else:
        cfg["quantization_config"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return f"quantization_config.{key} = {value!r}"


def m_qc(folder, rng):
    return _set_qc(folder, rng, QC_MUTATIONS)


def m_config(folder, rng):
    cfg = json.loads((folder / "config.json").read_text())
    key, values = rng.choice(CONFIG_MUTATIONS)
    value = rng.choice(values)
    if value is None:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return f"config.{key} = {value!r}"


BITPLANE_QC = [("min_bits", ["3", 8.5, [3], None, 2, 9, True, 4]), ("bits", [8.5, "6", [6], 5, 7])]


def m_qc_bitplane(folder, rng):
    cfg = json.loads((folder / "config.json").read_text())
    bitplane = cfg["quantization_config"].get("packing") == "bitplane-v1"
    return _set_qc(folder, rng, BITPLANE_QC if bitplane else QC_MUTATIONS)


MUTATORS = [m_dtype, m_dtype_same_size, m_shape, m_offsets, m_swap_offsets, m_drop_entry, m_rename,
            m_duplicate_key, m_entry_junk, m_metadata, m_header_len, m_header_bytes,
            m_header_whitespace, m_truncate, m_trailing, m_files, m_index, m_qc, m_config,
            m_data, m_values, m_qc_bitplane]


# -- running one folder -------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def api_outcome(folder: Path):
    """("ok", logits) or ("error", message); anything else propagates."""
    try:
        km = KbitModel.open(folder, verify=True)
        lm = build_model(km, "cpu", backend="native", dtype=torch.float32)
        with torch.no_grad():
            return "ok", lm.model(IDS)
    except KbitError as e:
        return "error", str(e)


def cli_outcome(folder: Path):
    r = CliRunner().invoke(cli, ["inspect", str(folder), "--json", "--verify"])
    if r.exit_code == 0:
        s = json.loads(r.stdout)
        # where it is, how padded, config echo, and whether the shards carry checksums
        for key in ("path", "file_bytes", "quantization", "verified"):
            s.pop(key)
        return "ok", s
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return "error", r.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("fuzzsrc") / "src")


@pytest.fixture(scope="module", params=["bitslice", "bitplane"])
def base(request, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / request.param
    outliers = OutlierSpec.parse("top:5%")
    # outliers (outlier_idx/outlier_weight), several shards and an index
    if request.param == "bitslice":
        convert(source, out, QuantConfig(bits=4, block_size=32, dtype="nf", outliers=outliers),
                max_shard_bytes=20_000)
    else:
        convert_any_precision(source, out, AnyPrecisionConfig(bits=5, min_bits=3, max_bits=5,
                                                              block_size=32, outliers=outliers),
                              max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and len(shards(out)) >= 3
    return out


def test_fuzz_reader(base, tmp_path):
    print(f"fuzz seed {SEED} ({base.name}; reproduce with KBIT_FUZZ_SEED={SEED})")
    ok_api, want_logits = api_outcome(base)
    ok_cli, want_summary = cli_outcome(base)
    assert ok_api == ok_cli == "ok"

    rng = random.Random(SEED)
    counts: Counter = Counter()
    unexpected, silent, hangs, multiline = [], [], [], []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(N_MUTATIONS):
            folder = tmp_path / f"m{i}"
            shutil.copytree(base, folder)
            mutate = MUTATORS[i % len(MUTATORS)]
            what = f"#{i} {mutate.__name__}: {mutate(folder, rng)}"
            signal.alarm(20)
            try:
                api = api_outcome(folder)
                cli_res = cli_outcome(folder)
            except Hang:
                hangs.append(what)
                continue
            except Exception as e:  # noqa: BLE001 -- the point: count what is not a clean error
                unexpected.append(f"{what}: {type(e).__name__}: {e}")
                continue
            finally:
                signal.alarm(0)
            for kind, res in (("api", api), ("cli", cli_res)):
                if res[0] == "error":
                    counts[f"{kind} error"] += 1
                    text = res[1].strip()
                    if "\n" in text or "Traceback" in text:
                        multiline.append(f"{what} ({kind}): {text[:300]}")
            if api[0] == "ok":
                if torch.equal(api[1], want_logits):
                    counts["api identical"] += 1
                else:
                    silent.append(f"{what}: api loads with other logits")
            if cli_res[0] == "ok":
                if cli_res[1] == want_summary and api[0] == "ok":
                    counts["cli identical"] += 1
                else:
                    silent.append(f"{what}: cli accepts (api: {api[0]})")
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    report = (f"seed {SEED} ({base.name}; KBIT_FUZZ_SEED={SEED} reproduces it)\n{counts}\n"
              f"unexpected {len(unexpected)}: {unexpected[:10]}\nsilent {len(silent)}: "
              f"{silent[:10]}\nhangs {len(hangs)}: {hangs[:5]}\nmulti-line {len(multiline)}: "
              f"{multiline[:5]}")
    print(report)
    assert not unexpected and not silent and not hangs and not multiline, report
    assert counts["api error"] + counts["api identical"] == N_MUTATIONS
    assert counts["api error"] >= N_MUTATIONS // 2 and counts["api identical"] >= 10, report
