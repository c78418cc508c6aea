"""The one reader of kbit folders: `kbit inspect`, `kbit dequantize` and the runtime all use it.

Opening validates everything that can be checked without reading weights: the quantization_config
(known format_version and packing), every shard's header and size (truncation), the format
metadata in each header, and, for every quantized linear, that its tensors exist with the dtypes
and shapes its recorded (N, K) and the settings imply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kbitrt.format import dtypes
from kbitrt.format.blockwise import QuantizedWeight
from kbitrt.format.model_check import check_against_model
from kbitrt.format.safetensors_io import SafetensorsFile
from kbitrt.format.stored_bytes import StoredBytes
from kbitrt.format.config import (CODEBOOK, OUTLIER_IDX, QUANT_SUFFIXES, QWEIGHT,
                                 SHAPE, KbitFormatError, LinearLayout, QuantConfig)


@dataclass
class ModuleEntry:
    name: str
    out_features: int
    in_features: int
    n_outliers: int


# config.json `dtype` -> dtype of every floating tensor kept unquantized (kbit convert writes 16 bit;
# a model loaded in fp32 through transformers and saved again keeps fp32)
FLOAT16 = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
PLAIN_INT_DTYPES = ("I64", "I32", "U8", "BOOL")  # integer buffers a model may carry (ids, masks)
SHARD_NAME = re.compile(r"^[\w.\-]+\.safetensors$")


def _fail(where, what: str, todo: str = "convert the model again") -> KbitFormatError:
    return KbitFormatError(f"{where}: {what}: {todo}")


class KbitModel(StoredBytes):
    def __init__(self, path: Path, config: dict, quant: QuantConfig,
                 files: dict[str, SafetensorsFile]):
        self.path = path
        self.config = config
        self.quant = quant
        self._file_of: dict[str, SafetensorsFile] = {}
        for f in files.values():
            for name in f.tensors:
                if name in self._file_of:
                    raise _fail(f.path, f"tensor {name} is also in {self._file_of[name].path.name}")
                self._file_of[name] = f
        self.files = files
        self.modules: dict[str, ModuleEntry] = {}
        self.transposed = set(config["quantization_config"].get("transposed_modules") or [])
        self.dtype16 = _dtype16(path, config)
        with torch.device("cpu"):  # callers may open a folder inside a meta-device context
            self._validate()
            check_against_model(self)

    @classmethod
    def open(cls, path: str | Path) -> KbitModel:
        """Open and validate a kbit folder; every violation is one KbitFormatError naming the file,
        the tensor and what to do (docs/format.md lists the checks)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise KbitFormatError(f"{path}: no such folder")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise KbitFormatError(f"{path} has no config.json: not a model folder")
        config = _read_json(cfg_path)
        if not isinstance(config, dict):
            raise _fail(cfg_path, "is not a JSON object")
        qc = config.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "kbit":
            raise KbitFormatError(f"{path} is not a kbit model (config.json has no kbit "
                                  "quantization_config): convert it first with `kbit convert`")
        if qc.get("packing") == "bitplane-v1":  # any-precision: kbitrt/format/bitplane.py
            from kbitrt.format.bitplane import BitplaneModel
            return BitplaneModel.open(path, config)
        try:
            quant = QuantConfig.from_json(qc)
        except KbitFormatError as e:
            raise KbitFormatError(f"{cfg_path}: {e}") from None
        index = path / "model.safetensors.index.json"
        weight_map = None
        if index.exists():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(k, str) and isinstance(v, str) and SHARD_NAME.match(v)
                    for k, v in weight_map.items()):
                raise _fail(index, "has no valid weight_map (tensor name -> shard file name)")
            shard_names = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            shard_names = ["model.safetensors"]
        else:
            raise KbitFormatError(f"{path} has no model.safetensors (nor an index): incomplete model")
        files = {}
        for s in shard_names:
            if not (path / s).is_file():
                raise _fail(path, f"shard {s} is missing", "download or convert the model again")
            f = SafetensorsFile(path / s)
            meta = f.metadata.get("kbit")
            if meta is None:
                raise _fail(path / s, "has no kbit metadata in its header")
            try:
                shard_quant = QuantConfig.from_json(json.loads(meta))
            except (json.JSONDecodeError, KbitFormatError) as e:
                raise _fail(path / s, f"has unreadable kbit metadata ({str(e)[:100]})") from None
            if shard_quant != quant:
                raise _fail(path / s, f"header says {shard_quant.label} but config.json says "
                                      f"{quant.label}", "the folder mixes two conversions; convert again")
            _check_order(f)
            if weight_map is not None:
                for name in f.tensors:
                    if weight_map.get(name) != s:
                        raise _fail(index, f"tensor {name} is in {s} but the index says "
                                           f"{weight_map.get(name)}")
            files[s] = f
        if weight_map is not None:
            absent = [n for n, s in weight_map.items() if n not in files[s].tensors]
            if absent:
                raise _fail(index, f"lists {len(absent)} tensors its shards lack (e.g. {absent[0]})")
        return cls(path, config, quant, files)

    def _validate(self) -> None:
        qc = self.config["quantization_config"]
        by_module: dict[str, set[str]] = {}
        for name in self._file_of:
            module, _, suffix = name.rpartition(".")
            if suffix in QUANT_SUFFIXES:
                by_module.setdefault(module, set()).add(suffix)
        for module in sorted(by_module):
            if QWEIGHT not in by_module[module]:
                extra = sorted(by_module[module])[0]
                raise _fail(self.file_path(f"{module}.{extra}"), f"tensor {module}.{extra} belongs to "
                            f"no quantized linear ({module}.{QWEIGHT} is missing)")
            self.modules[module] = self._validate_linear(module, by_module[module])
        if not self.modules:
            raise KbitFormatError(f"{self.path}: no quantized linears found: convert the model again")
        for name in self.plain_names:
            dtype = self.info(name).dtype
            if dtype in ("F16", "BF16", "F32", "F64"):
                if dtype != self.dtype16:
                    raise _fail(self.file_path(name), f"tensor {name} is {dtype}, but config.json "
                                f"says the model's 16-bit dtype is {self.dtype16}")
            elif dtype not in PLAIN_INT_DTYPES:
                raise _fail(self.file_path(name), f"tensor {name} has dtype {dtype}, which no kbit "
                                               "model stores")
        not_quantized = qc.get("modules_not_quantized") or []
        for key, names, bad in (("transposed_modules", self.transposed,
                                 lambda m: m not in self.modules),
                                ("modules_not_quantized", not_quantized, lambda m: m in self.modules)):
            wrong = sorted(m for m in names if bad(m))
            if wrong:
                raise _fail(self.path / "config.json", f"quantization_config.{key} names "
                            f"{wrong[0]}, which is {'not ' if key == 'transposed_modules' else ''}"
                            "a quantized linear of this folder")

    def _validate_linear(self, module: str, has: set[str]) -> ModuleEntry:
        q = self.quant
        shape_name = f"{module}.{SHAPE}"
        if SHAPE not in has:
            raise _fail(self.file_path(f"{module}.{QWEIGHT}"), f"{module} has no {SHAPE} tensor")
        info = self.info(shape_name)
        if info.dtype != "I64" or info.shape != (2,):
            raise _fail(self.file_path(shape_name), f"{shape_name} is {info.dtype}{list(info.shape)}, "
                                                 "expected I64[2]")
        n, k = (int(v) for v in self._read(shape_name).tolist())
        if not (0 < n < 2**31 and 0 < k < 2**31):
            raise _fail(self.file_path(shape_name), f"{shape_name} holds ({n}, {k}), not a linear's shape")
        n_out = 0
        if OUTLIER_IDX in has:
            oi = self.info(f"{module}.{OUTLIER_IDX}")
            n_out = oi.shape[0] if len(oi.shape) == 1 and oi.shape[0] < k else -1
            if n_out <= 0:
                raise _fail(self.file_path(f"{module}.{OUTLIER_IDX}"), f"{module}.{OUTLIER_IDX} has "
                            f"shape {list(oi.shape)}: expected 1 to {k - 1} column indices")
        cb_len = self.info(f"{module}.{CODEBOOK}").shape[0] \
            if CODEBOOK in has and len(self.info(f"{module}.{CODEBOOK}").shape) == 1 else 0
        fixed = dtypes.codebook_len(q)
        if not (2 <= cb_len <= 2**q.bits) or (q.dtype != "quantile" and cb_len != fixed):
            raise _fail(self.file_path(f"{module}.{QWEIGHT}"), f"{module}.{CODEBOOK} missing or has "
                        f"{cb_len} entries ({fixed if q.dtype != 'quantile' else f'at most {2**q.bits}'} "
                        f"for {q.dtype}{q.bits})")
        layout = LinearLayout(n, k, q, n_outliers=n_out, codebook_len=cb_len)
        specs = layout.tensor_specs(self.dtype16)
        for suffix in sorted(has - set(specs)):
            raise _fail(self.file_path(f"{module}.{suffix}"), f"tensor {module}.{suffix} does not belong "
                        f"to a {q.label} linear{' without outliers' if not n_out else ''}")
        for suffix, (dtype, shape) in specs.items():
            full = f"{module}.{suffix}"
            if full not in self._file_of:
                raise _fail(self.path, f"tensor {full} is missing")
            info = self.info(full)
            if info.shape != tuple(shape) or info.dtype != dtype:
                raise _fail(self.file_path(full), f"{full} is {info.dtype}{list(info.shape)}, expected "
                            f"{dtype}{list(shape)} for a ({n}, {k}) linear at {q.label}")
        cb = self._read(f"{module}.{CODEBOOK}")
        if not bool(torch.isfinite(cb).all()) or cb.abs().max() > 1 or bool((cb[1:] <= cb[:-1]).any()):
            raise _fail(self.file_path(f"{module}.{CODEBOOK}"), f"{module}.{CODEBOOK} is not a sorted "
                        "codebook of distinct finite values in [-1, 1]")
        if n_out:
            idx = self._read(f"{module}.{OUTLIER_IDX}")
            if int(idx.min()) < 0 or int(idx.max()) >= k or bool((idx[1:] <= idx[:-1]).any()):
                raise _fail(self.file_path(f"{module}.{OUTLIER_IDX}"), f"{module}.{OUTLIER_IDX} must be "
                            f"strictly increasing column indices in [0, {k})")
        return ModuleEntry(module, n, k, n_out)

    def file_path(self, name: str) -> Path:
        f = self._file_of.get(name)
        return f.path if f is not None else self.path

    def _suffixes(self, module: str) -> set[str]:
        return {s for s in QUANT_SUFFIXES if f"{module}.{s}" in self._file_of}

    def info(self, name: str):
        return self._file_of[name].tensors[name]

    def _read(self, name: str) -> torch.Tensor:
        return self._file_of[name].read(name)

    # -- what the runtime uses -------------------------------------------------------------
    @property
    def quantized_modules(self) -> list[str]:
        return list(self.modules)

    @property
    def plain_names(self) -> list[str]:
        return [n for n in sorted(self._file_of)
                if not (n.rpartition(".")[0] in self.modules and n.rpartition(".")[2] in QUANT_SUFFIXES)]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KbitFormatError(f"{self.path}: no tensor {name}")
        return self._read(name)

    def quantized(self, module: str) -> QuantizedWeight:
        e = self.modules[module]
        tensors = {s: self._read(f"{module}.{s}") for s in self._suffixes(module) if s != SHAPE}
        return QuantizedWeight.from_tensors(tensors, self.quant, (e.out_features, e.in_features))

    # -- accounting (byte counts: StoredBytes) -----------------------------------------------
    def summary(self) -> dict:
        """What `kbit inspect` shows and the model card records: exact figures from the bytes on disk."""
        qc = self.config["quantization_config"]
        pq, pt = self.params_quantized(), self.params_total()
        return {
            "path": str(self.path), "model_type": self.config.get("model_type"),
            "architectures": self.config.get("architectures"), "quantization": qc,
            "label": self.quant.label, "linears_quantized": len(self.modules),
            "modules_not_quantized": qc.get("modules_not_quantized", []),
            "params_total": pt, "params_quantized": pq,
            "bits_per_param_quantized": round(8 * self.quantized_bytes() / max(pq, 1), 6),
            "bits_per_param_model": round(8 * self.tensor_bytes() / max(pt, 1), 6),
            "tensor_bytes": self.tensor_bytes(), "file_bytes": self.file_bytes(), "shards": len(self.files),
            "outlier_columns": sum(e.n_outliers for e in self.modules.values()),
            "modules": [{"name": e.name, "out_features": e.out_features, "in_features": e.in_features,
                         "outliers": e.n_outliers} for e in self.modules.values()],
        }


def _check_order(f: SafetensorsFile) -> None:
    """kbit shards store tensors in name order (kbit convert), or grouped by dtype and in name order
    within each group (the safetensors library, e.g. transformers' save_pretrained). Two tensors of
    one size whose offsets were swapped break both orders and are refused."""
    by_offset = sorted(f.tensors, key=lambda n: f.tensors[n].begin)
    if by_offset == sorted(f.tensors):
        return
    groups: list[str] = []
    for name in by_offset:
        dtype = f.tensors[name].dtype
        if not groups or groups[-1] != dtype:
            groups.append(dtype)
    in_group_order = all(
        [n for n in by_offset if f.tensors[n].dtype == d] == sorted(n for n in f.tensors
                                                                   if f.tensors[n].dtype == d)
        for d in set(groups))
    if len(groups) != len(set(groups)) or not in_group_order:
        raise _fail(f.path, "stores its tensors out of order (data_offsets point at another "
                            "tensor's bytes)", "download or convert the model again")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise KbitFormatError(f"{path}: permission denied: make the file readable") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise _fail(path, f"is not valid UTF-8 JSON ({str(e).splitlines()[0][:80]})") from None


def _dtype16(path: Path, config: dict) -> str:
    """The safetensors dtype of everything kept in 16 bit, from config.json's `dtype`."""
    declared = config.get("dtype", config.get("torch_dtype"))
    if declared not in FLOAT16:
        raise _fail(path / "config.json", f"dtype is {declared!r}: a kbit model says float16, "
                                          "bfloat16 or float32 for what it keeps unquantized")
    return FLOAT16[declared]
